"""Reading experts' routing samples and descriptions: from an LMoE package (a folder, or a
prefix in an object store) and from the URIs an ``adapter.published`` event carries.

LMoE layout: ``<package>/adapters/<expert>/description.txt`` (beside the PEFT files) and
``<package>/routing_data/expert_<expert>.jsonl``, one ``{"instruction": "..."}`` per line.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from airoboros.errors import ConfigError, NotFoundError
from airoboros.ports import ObjectStore

log = logging.getLogger(__name__)

ROUTING_FILE = re.compile(r"(?:^|/)routing_data/expert_(?P<name>[^/]+)\.jsonl$")
DESCRIPTION_FILE = re.compile(r"(?:^|/)adapters/(?P<name>[^/]+)/description\.txt$")
#: builds the store for one bucket (``s3://<bucket>``) with the service's endpoint and keys
StoreFactory = Callable[[str], ObjectStore]


@dataclass(frozen=True)
class ExpertSource:
    """What the router needs of one expert: its name, one line saying what it is good at,
    and its routing samples (``system + " " + instruction``, as the trainer writes them)."""

    name: str
    description: str
    samples: tuple[str, ...]


def parse_routing_jsonl(data: bytes, *, origin: str = "") -> list[str]:
    """The ``instruction`` of each line; blank and unreadable lines are skipped (and
    counted in a warning), so one bad line does not cost an expert its routing."""
    out: list[str] = []
    bad = 0
    for line in data.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        text = row.get("instruction") if isinstance(row, dict) else None
        if isinstance(text, str) and text.strip():
            out.append(text.strip())
        else:
            bad += 1
    if bad:
        log.warning("%s: skipped %d routing line(s) without an instruction", origin or "?", bad)
    return out


class Reader:
    """Reads URIs and packages: local paths, ``file://`` URLs and ``s3://<bucket>/<key>``
    (through ``store_for``, one store per bucket)."""

    def __init__(self, store_for: StoreFactory | None = None) -> None:
        self._store_for = store_for
        self._stores: dict[str, ObjectStore] = {}

    def _store(self, bucket: str) -> ObjectStore:
        if self._store_for is None:
            raise ConfigError([f"s3://{bucket}: no object store is configured for the router"])
        if bucket not in self._stores:
            self._stores[bucket] = self._store_for(bucket)
        return self._stores[bucket]

    @staticmethod
    def _split_s3(uri: str) -> tuple[str, str]:
        parts = urlsplit(uri)
        return parts.netloc, parts.path.strip("/")

    @staticmethod
    def _local(uri: str) -> Path:
        if uri.startswith("file://"):
            return Path(unquote(urlsplit(uri).path))
        return Path(uri)

    async def read(self, uri: str) -> bytes:
        """The bytes at ``uri``; ``NotFoundError`` when there is nothing there."""
        if uri.startswith("s3://"):
            bucket, key = self._split_s3(uri)
            return await self._store(bucket).get_bytes(key)
        path = self._local(uri)
        if not path.is_file():
            raise NotFoundError(f"no file {path}")
        return path.read_bytes()

    async def read_text(self, uri: str, default: str = "") -> str:
        try:
            return (await self.read(uri)).decode("utf-8", errors="replace").strip()
        except NotFoundError:
            return default

    async def _list(self, location: str) -> tuple[str, list[str]]:
        """(base to join keys to, keys relative to the package)."""
        if location.startswith("s3://"):
            bucket, prefix = self._split_s3(location)
            keys = await self._store(bucket).list(f"{prefix}/" if prefix else "")
            base = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
            return base, [k[len(prefix) :].lstrip("/") for k in keys]
        root = self._local(location)
        if not root.is_dir():
            raise ConfigError([f"lmoe: {root} is not a folder (an LMoE package)"])
        keys = [
            str(p.relative_to(root))
            for sub in ("adapters", "routing_data")
            if (root / sub).is_dir()
            for p in (root / sub).rglob("*")
            if p.is_file()
        ]
        return str(root), keys

    async def package(self, location: str) -> list[ExpertSource]:
        """Every expert of the package at ``location``: those with an adapter folder's
        description, a routing file, or both (an expert without routing samples can be
        chosen by name, never by the embedding rule)."""
        base, keys = await self._list(location)
        routing: dict[str, str] = {}
        described: dict[str, str] = {}
        for key in keys:
            if m := ROUTING_FILE.search(key):
                routing[m["name"]] = key
            elif m := DESCRIPTION_FILE.search(key):
                described[m["name"]] = key
        out: list[ExpertSource] = []
        for name in sorted(set(routing) | set(described)):
            description = ""
            if name in described:
                description = await self.read_text(f"{base}/{described[name]}")
            samples: list[str] = []
            if name in routing:
                uri = f"{base}/{routing[name]}"
                samples = parse_routing_jsonl(await self.read(uri), origin=uri)
            out.append(ExpertSource(name, description, tuple(samples)))
        return out
