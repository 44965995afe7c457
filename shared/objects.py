"""Object store adapters. ``LocalObjectStore`` keeps objects as files under a folder."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from airoboros.errors import NotFoundError


class LocalObjectStore:
    """Objects as files; writes go to a temp file and are renamed into place (atomic)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    @classmethod
    def from_url(cls, url: str) -> LocalObjectStore:
        if url.startswith("file://"):
            return cls(url[len("file://") :])
        return cls(url)

    def _path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if self.root not in p.parents:
            raise ValueError(f"object key escapes the store: {key!r}")
        return p

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def _put(self, key: str, data: bytes) -> str:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return p.as_uri()

    async def put_bytes(self, key: str, data: bytes) -> str:
        return await asyncio.to_thread(self._put, key, data)

    async def get_bytes(self, key: str) -> bytes:
        p = self._path(key)
        if not p.is_file():
            raise NotFoundError(f"no object {key!r}")
        return await asyncio.to_thread(p.read_bytes)

    async def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    async def list(self, prefix: str = "") -> list[str]:
        if not self.root.exists():
            return []
        keys = [
            str(p.relative_to(self.root))
            for p in self.root.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        ]
        return sorted(k for k in keys if k.startswith(prefix))

    async def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
