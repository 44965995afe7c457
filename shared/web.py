"""What the HTTP APIs (topics, router, inference) share at their edge: the API-key check
and the size-limited request body. Each API raises its own error type; these only decide."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


def bearer_token(authorization: str, keys: Sequence[bytes]) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header when it is one of ``keys``,
    else None. Every key is compared, each in constant time."""
    scheme, _, token = authorization.partition(" ")
    given = token.strip().encode()
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given, k)
    return token.strip() if ok and scheme.lower() == "bearer" else None


@dataclass(frozen=True)
class Principal:
    """Who is calling: the digest of their API key (what their jobs are owned by), and
    whether it is an admin key (which sees every job)."""

    owner: str
    admin: bool = False

    def may_see(self, owner: str | None) -> bool:
        return self.admin or (owner is not None and hmac.compare_digest(owner, self.owner))


def key_owner(key: str) -> str:
    """The owner id of an API key: a digest, so that no key is stored."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


async def read_body(request: Any, limit: int, too_large: Exception) -> bytes:
    """The request body; ``too_large`` is raised beyond ``limit`` bytes, before anything
    is read when Content-Length says so."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large
    return bytes(body)


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """An ``openapi_extra`` that declares ``model`` as a route's JSON body, for routes that
    read the raw body themselves (authorised and size-capped before it is parsed), which
    FastAPI cannot infer; the schema is inlined (``$defs`` resolved) to stand alone."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, list):
            return [inline(v) for v in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return inline({**defs[ref.removeprefix("#/$defs/")], **rest})
        return {k: inline(v) for k, v in node.items()}

    content = {"application/json": {"schema": inline(schema)}}
    return {"requestBody": {"required": True, "content": content}}
