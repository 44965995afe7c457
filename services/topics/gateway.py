"""The web console's way to the router: which pods hold which adapters (the router's
``GET /v1/pods``) and the playground's chat completions, passed through.

The router is reached server-side, at the operator's ``AIROBOROS_ROUTER_URL`` only: no
body field or header of a client names where a request goes (DESIGN rule 12). The key
sent is the operator's ``AIROBOROS_ROUTER_API_KEY`` when set, else the caller's own
Authorization header (which then must be a router key too).

httpx, not aiohttp: it is a core dependency of every image (aiohttp is the router's own,
chosen there for the per-request cost that a console does not pay at its rate).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from pydantic import ValidationError

from airoboros import telemetry
from airoboros.errors import BadGateway, ServiceUnavailable
from airoboros.protocol import PodList, error_body

log = logging.getLogger(__name__)

#: headers of the router's answer that reach the console
PASS_HEADERS = (
    "x-airoboros-expert",
    "x-airoboros-route",
    "x-airoboros-routing-ms",
    "retry-after",
    "x-request-id",
    "x-should-retry",
)
#: seconds for ``GET /v1/pods`` (the experts page must not hang on a router that does)
PODS_TIMEOUT = 5.0


def _message(resp: httpx.Response, content: bytes) -> str:
    """The message of an error answer in the one envelope, or its text."""
    try:
        data: Any = json.loads(content)
    except ValueError:
        return content.decode("utf-8", errors="replace").strip()[:500] or resp.reason_phrase
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message") or resp.reason_phrase)
    return json.dumps(data)[:500]


class Upstream:
    """The router's answer to a playground request: status and headers known, the body
    to stream (``chunks``) or to read whole (``read``). ``aclose`` (idempotent) frees the
    connection whichever way the answer ends."""

    def __init__(self, resp: httpx.Response, where: str) -> None:
        self._resp = resp
        self._where = where
        self.status = resp.status_code
        self.headers = {h: resp.headers[h] for h in PASS_HEADERS if h in resp.headers}
        content_type = str(resp.headers.get("content-type", "application/json"))
        self.media_type = content_type.split(";")[0].strip()

    @property
    def streamed(self) -> bool:
        return self.media_type == "text/event-stream"

    async def chunks(self) -> AsyncIterator[bytes]:
        """The events as they come; a stream that breaks off ends with an error event
        (``data: {"error": ...}``), as the router's own streams do."""
        try:
            async for chunk in self._resp.aiter_bytes():
                yield chunk
        except httpx.HTTPError as exc:
            log.warning("playground stream from %s broke off: %r", self._where, exc)
            body = error_body(
                f"the router's stream broke off ({type(exc).__name__}); the answer is incomplete",
                "server_error",
                "router_stream_error",
            )
            yield b"data: " + json.dumps(body).encode() + b"\n\n"
        finally:
            await self.aclose()

    async def read(self) -> bytes:
        try:
            return await self._resp.aread()
        except httpx.HTTPError as exc:
            raise BadGateway(
                f"the router failed while answering ({type(exc).__name__})",
                code="router_error",
            ) from None
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self._resp.aclose()


class RouterGateway:
    """Requests of the console to the configured router. Nothing connects before the
    first request; ``aclose`` closes the connection pool."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None = None,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 600.0,
    ) -> None:
        #: the router's root (no ``/v1``); None: no router configured
        self.base_url = base_url
        self.api_key = api_key
        self._timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            # trust_env off: an egress proxy of the environment is not the way to a
            # service next door (the router's own client does the same).
            self._client = httpx.AsyncClient(timeout=self._timeout, trust_env=False)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _headers(self, authorization: str) -> dict[str, str]:
        key = f"Bearer {self.api_key}" if self.api_key else authorization
        headers = {"authorization": key, "content-type": "application/json"}
        return telemetry.inject(headers)

    async def pods(self, authorization: str) -> tuple[list[dict[str, Any]], str | None]:
        """The router's pods (url, healthy, outstanding, adapters, ...) and, instead of
        raising, why they could not be listed: ([], None) when no router is configured."""
        if self.base_url is None:
            return [], None
        where = f"the router at {self.base_url}"
        try:
            resp = await self.client.get(
                f"{self.base_url}/v1/pods",
                headers=self._headers(authorization),
                timeout=PODS_TIMEOUT,
            )
        except httpx.HTTPError as exc:
            return [], f"{where} cannot be reached ({type(exc).__name__}: {exc})"
        if resp.status_code != 200:
            detail = _message(resp, resp.content)
            if resp.status_code in (401, 403):
                detail += " (set AIROBOROS_ROUTER_API_KEY on the topics service)"
            return [], f"{where} answered HTTP {resp.status_code}: {detail}"
        try:
            listing = PodList.model_validate_json(resp.content)
        except ValidationError:
            return [], f"{where} did not answer /v1/pods with a list of pods (an older router?)"
        return [p.model_dump() for p in listing.data], None

    async def chat(self, body: bytes, authorization: str) -> Upstream:
        """POST ``body`` as it is to the router's ``/v1/chat/completions``; returns once
        the router has answered with its status and headers. Raises ServiceUnavailable
        (503) when no router is configured or it cannot be reached, BadGateway when it
        refuses the key (so that the console does not take it for its own key's fault)."""
        if self.base_url is None:
            raise ServiceUnavailable(
                "the playground needs a router: set AIROBOROS_ROUTER_URL on the topics service",
                code="router_not_configured",
            )
        url = f"{self.base_url}/v1/chat/completions"
        request = self.client.build_request(
            "POST", url, content=body, headers=self._headers(authorization)
        )
        try:
            resp = await self.client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise ServiceUnavailable(
                f"the router at {self.base_url} cannot be reached ({type(exc).__name__}); "
                "try again shortly",
                code="router_unavailable",
            ) from None
        except httpx.HTTPError as exc:
            raise BadGateway(
                f"the router at {self.base_url} failed ({type(exc).__name__}: {exc})",
                code="router_error",
            ) from None
        upstream = Upstream(resp, self.base_url)
        if resp.status_code in (401, 403):
            content = await upstream.read()
            raise BadGateway(
                f"the router refused the key the console sent (HTTP {resp.status_code}: "
                f"{_message(resp, content)}); the operator sets AIROBOROS_ROUTER_API_KEY on "
                "the topics service, or gives this key to the router",
                code="router_unauthorized",
            )
        return upstream
