"""Where adapters come from, and what is accepted: names, folders, files.

An adapter is named by the client (``^[A-Za-z0-9_.-]{1,64}$``, not ``.``/``..``) and comes
from one of:

- a local folder, which must resolve (symlinks followed) inside a configured root: an LMoE
  package, ``adapter_roots``, or the fetch cache;
- ``file:///...``, the same as a path;
- ``s3://<bucket>/<prefix>``, the adapter's folder in the configured bucket: its files are
  fetched into ``cache_dir`` and loaded from there.

The folder must hold ``adapter_config.json`` (a LoRA, ``peft_type: LORA``) and
``adapter_model.safetensors``; pickled weights (``adapter_model.bin``) are refused, since
unpickling runs code. ``description.txt`` is optional.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from airoboros.errors import AdapterRejected, AdapterUnavailable, NotFoundError, StoreError
from airoboros.inference.settings import InferenceSettings

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DESCRIPTION_FILE = "description.txt"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
#: a PEFT adapter_config.json is a few KB; refuse anything absurd before parsing it
MAX_CONFIG_BYTES = 1024 * 1024

ObjectStoreFactory = Callable[[str], Any]  # bucket -> an ObjectStore (get_bytes)


def check_name(name: str, *, reserved: Sequence[str] = ()) -> str:
    """Return ``name`` if it may name an adapter, else raise ``AdapterRejected``."""
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
        raise AdapterRejected(
            f"invalid adapter name {str(name)[:80]!r}: use 1 to 64 letters, digits, '_', "
            "'.' or '-' (and not '.' or '..')",
            param="name",
        )
    if name == "__base__" or name in reserved:
        raise AdapterRejected(
            f"adapter name {name!r} is reserved (it names the base model)", param="name"
        )
    return name


@dataclass(frozen=True)
class ResolvedAdapter:
    """An adapter folder that passed the checks, and where it came from."""

    source: str
    folder: Path
    description: str
    config: dict[str, Any]


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path.is_relative_to(r) for r in roots)


def check_folder(folder: Path, roots: Sequence[Path], *, shown: str, param: str) -> ResolvedAdapter:
    """Validate an adapter folder (see the module doc). ``shown`` is how the error names
    it (the path or URI the client gave)."""
    resolved_roots = [r.resolve() for r in roots]
    try:
        real = folder.resolve(strict=False)
    except (OSError, RuntimeError, ValueError) as exc:  # ValueError: a NUL in the path
        raise AdapterRejected(
            f"adapter path {shown!r} cannot be resolved: {exc}", param=param
        ) from exc
    if not _inside(real, resolved_roots):
        allowed = ", ".join(str(r) for r in resolved_roots) or "(none configured)"
        raise AdapterRejected(
            f"adapter path {shown!r} is outside the adapter roots ({allowed}); set "
            "AIROBOROS_ADAPTER_ROOTS to allow another folder",
            param=param,
        )
    if not real.is_dir():
        raise AdapterRejected(f"no adapter folder at {shown!r}", param=param)
    files: dict[str, Path] = {}
    for name in (CONFIG_FILE, WEIGHTS_FILE, DESCRIPTION_FILE):
        p = real / name
        if p.exists():
            target = p.resolve()
            # A symlink inside the folder must not reach out of the roots either.
            if not _inside(target, resolved_roots) or not target.is_file():
                raise AdapterRejected(
                    f"{name} in {shown!r} links outside the adapter roots", param=param
                )
            files[name] = target
    if WEIGHTS_FILE not in files:
        pickled = [n for n in PICKLED_WEIGHTS if (real / n).exists()]
        if pickled:
            raise AdapterRejected(
                f"adapter {shown!r} has only pickled weights ({pickled[0]}); only "
                f"safetensors weights are accepted: convert it and save {WEIGHTS_FILE} "
                "(peft: save_pretrained(..., safe_serialization=True))",
                param=param,
            )
        raise AdapterRejected(f"adapter {shown!r} has no {WEIGHTS_FILE}", param=param)
    if CONFIG_FILE not in files:
        raise AdapterRejected(f"adapter {shown!r} has no {CONFIG_FILE}", param=param)
    if files[CONFIG_FILE].stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterRejected(f"{CONFIG_FILE} of {shown!r} is too large", param=param)
    try:
        config = json.loads(files[CONFIG_FILE].read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterRejected(
            f"{CONFIG_FILE} of {shown!r} is not valid JSON: {exc}", param=param
        ) from exc
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise AdapterRejected(
            f"adapter {shown!r} is not a LoRA adapter (peft_type {kind!r}); only LoRA "
            "adapters can be batched together",
            param=param,
        )
    _check_safetensors(files[WEIGHTS_FILE], shown, param)
    description = ""
    if DESCRIPTION_FILE in files:
        description = files[DESCRIPTION_FILE].read_text(encoding="utf-8", errors="replace").strip()
    return ResolvedAdapter(source=shown, folder=real, description=description, config=config)


def _check_safetensors(path: Path, shown: str, param: str) -> None:
    """Parse the safetensors header only: a renamed pickle or a truncated file fails here,
    not inside the model."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:
        raise AdapterRejected(
            f"{WEIGHTS_FILE} of {shown!r} is not a readable safetensors file: {exc}", param=param
        ) from exc
    if not keys:
        raise AdapterRejected(f"{WEIGHTS_FILE} of {shown!r} holds no tensors", param=param)


class AdapterSources:
    """Resolves what a client or an announcement names into a checked local folder."""

    def __init__(
        self, settings: InferenceSettings, object_store: ObjectStoreFactory | None = None
    ) -> None:
        self.settings = settings
        self.roots = [p.resolve() for p in settings.adapter_root_list()]
        self.cache = Path(settings.cache_dir).resolve()
        self._object_store = object_store

    def _store(self, bucket: str) -> Any:
        if self._object_store is not None:
            return self._object_store(bucket)
        from airoboros.objects_s3 import make_object_store

        s = self.settings
        return make_object_store(
            f"s3://{bucket}",
            endpoint=s.s3_endpoint,
            access_key=s.s3_access_key,
            secret_key=s.s3_secret_key,
            secure=s.s3_secure,
        )

    async def resolve(self, source: str, *, param: str = "path") -> ResolvedAdapter:
        """Check ``source`` and, for s3://, fetch it; raise ``AdapterRejected`` when it is
        not acceptable and ``AdapterUnavailable`` when the store cannot deliver it."""
        if not isinstance(source, str) or not source.strip():
            raise AdapterRejected("give the adapter's path or uri", param=param)
        source = source.strip()
        parts = urlsplit(source)
        if parts.scheme == "s3":
            return await self._fetch_s3(source, parts.netloc, parts.path, param)
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise AdapterRejected(f"file URI {source!r} names a remote host", param=param)
            return check_folder(Path(unquote(parts.path)), self.roots, shown=source, param=param)
        if len(parts.scheme) > 1:  # one letter is a Windows drive
            raise AdapterRejected(
                f"unsupported adapter source {source!r}: use a local path, file:// or s3://",
                param=param,
            )
        return check_folder(Path(source), self.roots, shown=source, param=param)

    async def _fetch_s3(self, source: str, bucket: str, path: str, param: str) -> ResolvedAdapter:
        if bucket != self.settings.s3_bucket:
            raise AdapterRejected(
                f"adapter URI {source!r} is outside the configured bucket "
                f"{self.settings.s3_bucket!r}",
                param=param,
            )
        prefix = path.strip("/")
        segments = prefix.split("/")
        if not prefix or any(s in ("", ".", "..") for s in segments):
            raise AdapterRejected(
                f"adapter URI {source!r} must name the adapter's folder in the bucket "
                "(s3://<bucket>/<prefix>, without '.' or '..' segments)",
                param=param,
            )
        store = self._store(bucket)
        digest = hashlib.sha256(source.encode("utf-8")).hexdigest()[:24]
        folder = self.cache / "s3" / digest
        folder.mkdir(parents=True, exist_ok=True)
        for name in (CONFIG_FILE, WEIGHTS_FILE, DESCRIPTION_FILE):
            key = f"{prefix}/{name}"
            try:
                data = await store.get_bytes(key)
            except NotFoundError:
                if name == DESCRIPTION_FILE:
                    continue
                if name == WEIGHTS_FILE:
                    for pickled in PICKLED_WEIGHTS:
                        if await store.exists(f"{prefix}/{pickled}"):
                            raise AdapterRejected(
                                f"adapter {source!r} has only pickled weights ({pickled}); "
                                f"only safetensors weights are accepted ({WEIGHTS_FILE})",
                                param=param,
                            ) from None
                raise AdapterRejected(f"adapter {source!r} has no {name}", param=param) from None
            except StoreError as exc:
                raise AdapterUnavailable(f"cannot fetch adapter {source!r}: {exc}") from exc
            tmp = folder / f".{name}.part"
            tmp.write_bytes(data)
            tmp.replace(folder / name)
        return check_folder(folder, [self.cache], shown=source, param=param)


def package_adapters(lmoe: Path) -> list[tuple[str, Path]]:
    """The ``adapters/<name>/`` folders of an LMoE package, sorted by name."""
    root = lmoe / "adapters"
    if not root.is_dir():
        return []
    return sorted((p.name, p) for p in root.iterdir() if p.is_dir())
