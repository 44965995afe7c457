"""What a config posted to the services may ask of them (DESIGN rule 12).

A posted config is data from a stranger. The server never reads a path, loads a model or
calls a URL that it names unless the operator allowed that root or endpoint, and never
sends its own credentials anywhere but to its own configured endpoint. Counts and batch
sizes are bounded. Embedded CLI runs do not go through this: a local config is the user's
own and reads local paths as always.

The operator's side is ``ServerPolicy`` (from the service settings): the base URLs a job
may name (``AIROBOROS_ALLOWED_BASE_URLS``, none by default), the folders path-like keys may
point into (``AIROBOROS_ALLOWED_PATHS``, none by default), and the bounds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

#: OpenAI's endpoint, where the SDK goes when no base URL is set
OPENAI_BASE_URL = "https://api.openai.com/v1"

#: Keys that name a file, a folder or a URL: the ones we know, and any named like them.
_PATH_LIKE = re.compile(r"(^|_)(path|paths|dir|dirs|file|files|url|urls|root|roots)$")
#: Path-like keys the services never read or write: the embedded run's output, its local
#: topics file and card folder, its store URLs. They are dropped from a posted config,
#: with a warning, so that nothing is kept that could one day be read.
INERT = frozenset(
    {
        "output_path",
        "topics_path",
        "output_dir",
        "database_url",
        "object_store_url",
        "vector_store_url",
        "vertexai_credentials_path",
    }
)
#: Keys whose value is a URL the server would call: only from the allow-list.
ENDPOINT_KEYS = frozenset({"base_url"})
#: Keys naming a model the server would load from disk (a path or a hub name).
MODEL_KEYS = frozenset({"embedding_model"})
#: api_params the SDK would turn into transport options (headers, query, body, timeouts,
#: streaming) rather than sampling parameters; ``n`` multiplies a call's cost unseen.
TRANSPORT_PARAMS = frozenset({"extra_headers", "extra_query", "extra_body", "timeout", "stream"})


def normalize_url(url: str) -> str:
    """A base URL in one spelling: lower-case scheme and host, default port dropped, no
    trailing slash, no query or fragment."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    port = parts.port
    if port is not None and (scheme, port) not in (("http", 80), ("https", 443)):
        host = f"{host}:{port}"
    return f"{scheme}://{host}{parts.path.rstrip('/')}"


@dataclass(frozen=True)
class ServerPolicy:
    #: base URLs a posted job may name (normalised); the server's own is always allowed
    allowed_base_urls: tuple[str, ...] = ()
    #: folders that path-like keys of a posted config may point into (resolved)
    allowed_roots: tuple[Path, ...] = ()
    #: the endpoint the server's own key belongs to (None: OpenAI)
    server_base_url: str | None = None
    #: embedding models a job may name (besides the server's default)
    allowed_models: tuple[str, ...] = ()
    max_count: int = 1_000_000
    max_batch_size: int = 100
    max_topic_requests: int = 1_000
    max_concurrency: int = 256
    #: problems reported at most
    max_problems: int = 50

    @classmethod
    def from_settings(cls, settings: Any) -> ServerPolicy:
        def split(value: str) -> list[str]:
            return [v.strip() for v in re.split(r"[,\n]", value or "") if v.strip()]

        return cls(
            allowed_base_urls=tuple(normalize_url(u) for u in split(settings.allowed_base_urls)),
            allowed_roots=tuple(Path(p).resolve() for p in split(settings.allowed_paths)),
            server_base_url=settings.openai_base_url or None,
            allowed_models=tuple(split(getattr(settings, "allowed_embedding_models", ""))),
            max_count=settings.max_count,
            max_batch_size=settings.max_batch_size,
        )

    # --- endpoints and keys ---------------------------------------------------------------
    @property
    def own_endpoint(self) -> str:
        return normalize_url(self.server_base_url or OPENAI_BASE_URL)

    def is_own_endpoint(self, base_url: str | None) -> bool:
        return base_url is None or normalize_url(base_url) == self.own_endpoint

    def endpoint_allowed(self, base_url: str) -> bool:
        try:
            url = normalize_url(base_url)
        except ValueError:
            return False
        return url == self.own_endpoint or url in self.allowed_base_urls

    def credentials(
        self, base_url: str | None, job_key: str | None, server_key: str | None
    ) -> tuple[str | None, str | None]:
        """(base URL, key) for a job's calls: the job's endpoint or the server's, and the
        job's own key, or the server's key only when the calls go to the server's own
        endpoint. A job naming an endpoint that is not allowed gets neither."""
        if base_url is not None and not self.is_own_endpoint(base_url):
            if not self.endpoint_allowed(base_url):
                raise PermissionError("base_url is not an allowed endpoint")
            return base_url, job_key
        return base_url or self.server_base_url, job_key or server_key

    # --- paths ----------------------------------------------------------------------------
    def resolve(self, value: str) -> Path | None:
        """The path ``value`` names inside an allowed root (relative paths are taken
        relative to each root in turn), or None when it is outside every root."""
        raw = Path(value).expanduser()
        candidates = [raw] if raw.is_absolute() else [root / raw for root in self.allowed_roots]
        for c in candidates:
            real = Path(os.path.realpath(c))
            for root in self.allowed_roots:
                if real == root or root in real.parents:
                    return real
        return None

    # --- the check ------------------------------------------------------------------------
    def review(self, raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
        """Check a posted config (the raw mapping): (the config to keep, with inert keys
        dropped and allowed paths resolved; problems, each 'key: message'; warnings)."""
        problems: list[str] = []
        warnings: list[str] = []
        kept = dict(raw)
        for key in sorted(k for k in raw if k in INERT and raw[k] is not None):
            kept.pop(key)
            warnings.append(f"{key} is ignored by the services (rows go to the store)")
        self._review_block(kept, "", problems)
        instructors = kept.get("instructors")
        if isinstance(instructors, Mapping):
            blocks: dict[str, Any] = {}
            for name, block in instructors.items():
                if isinstance(block, Mapping):
                    block = dict(block)
                    for key in sorted(k for k in block if k in INERT and block[k] is not None):
                        block.pop(key)
                        warnings.append(f"instructors.{name}.{key} is ignored by the services")
                    self._review_block(block, f"instructors.{name}.", problems)
                    self._bounds(block, f"instructors.{name}.", problems)
                blocks[str(name)] = block
            kept["instructors"] = blocks
        self._bounds(kept, "", problems)
        return kept, problems[: self.max_problems], warnings

    def _review_block(self, block: dict[str, Any], prefix: str, problems: list[str]) -> None:
        """Check every key of ``block``, and of the mappings nested in it (api_params,
        judge, ...): endpoints, models and anything named like a path."""
        for key in list(block):
            value = block[key]
            if value is None or not isinstance(key, str):
                continue
            where = f"{prefix}{key}"
            if key in ENDPOINT_KEYS:
                if not isinstance(value, str) or not self.endpoint_allowed(value):
                    problems.append(
                        f"{where}: not an endpoint this server may call; the operator allows "
                        "endpoints with AIROBOROS_ALLOWED_BASE_URLS"
                    )
            elif key in MODEL_KEYS:
                if not self._model_allowed(value):
                    problems.append(
                        f"{where}: a posted job may only name the server's embedding model"
                        " (or one in AIROBOROS_ALLOWED_EMBEDDING_MODELS)"
                    )
            elif _PATH_LIKE.search(key):
                values = [value] if isinstance(value, str) else value
                if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                    problems.append(f"{where}: must be a path (a string)")
                    continue
                resolved = [self._path(v, where, problems) for v in values]
                if all(r is not None for r in resolved):
                    paths = [str(r) for r in resolved]
                    block[key] = paths[0] if isinstance(value, str) else paths
            elif isinstance(value, Mapping) and key != "instructors":
                nested = dict(value)
                if key == "api_params":
                    self._review_params(nested, where, problems)
                self._review_block(nested, f"{where}.", problems)
                block[key] = nested

    def _review_params(self, params: Mapping[str, Any], where: str, problems: list[str]) -> None:
        for key in sorted(k for k in params if k in TRANSPORT_PARAMS):
            problems.append(
                f"{where}.{key}: not a sampling parameter; not accepted in a posted job"
            )
        n = params.get("n")
        if n is not None and n != 1:
            problems.append(f"{where}.n: one completion per call in a posted job")

    def _path(self, value: str, where: str, problems: list[str]) -> Path | None:
        path = self.resolve(value)
        if path is None:
            # The same words whether or not the path exists: no oracle for the server's disk.
            problems.append(
                f"{where}: a posted job may not name a path on the server outside the "
                "folders the operator allows (AIROBOROS_ALLOWED_PATHS); upload documents "
                "with POST /v1/documents instead"
            )
        return path

    def _model_allowed(self, value: Any) -> bool:
        if not isinstance(value, str):
            return False
        from airoboros.embeddings import DEFAULT_EMBEDDING_MODEL

        defaults = {DEFAULT_EMBEDDING_MODEL, f"sentence-transformers/{DEFAULT_EMBEDDING_MODEL}"}
        return value in defaults or value in self.allowed_models

    def _bounds(self, block: Mapping[str, Any], prefix: str, problems: list[str]) -> None:
        for key, most in (
            ("count", self.max_count),
            ("default_count", self.max_count),
            ("batch_size", self.max_batch_size),
            ("default_batch_size", self.max_batch_size),
            ("topic_request_count", self.max_topic_requests),
            ("max_concurrency", self.max_concurrency),
        ):
            v = block.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > most:
                problems.append(f"{prefix}{key}: at most {most} on this server")
