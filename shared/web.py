"""What the HTTP APIs (topics, router, inference) share at their edge: the API-key check
and the size-limited request body. Each API raises its own error type; these only decide."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Any


def bearer_token(authorization: str, keys: Sequence[bytes]) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header when it is one of ``keys``,
    else None. Every key is compared, each in constant time."""
    scheme, _, token = authorization.partition(" ")
    given = token.strip().encode()
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given, k)
    return token.strip() if ok and scheme.lower() == "bearer" else None


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
