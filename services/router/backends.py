"""Forwarding to OpenAI-compatible backends: inference pods, TGI-fronting pods, vLLM with
LoRA (the adapter's name is the ``model``), or anything else that speaks the API.

Choosing a pod: healthy pods only (all of them, as a last resort, when none is), those
that already hold the expert first (learnt from their ``GET /v1/models`` and from what
they have answered), unless such a pod has more than ``affinity_slack`` requests in flight
beyond the least loaded one (bounded spill-over: a popular expert does not pile onto one
pod); then the fewest requests in flight; ties in turn.

Failover: a connection that cannot be opened (or a pod answering 503) moves the request
to the next pod. Nothing is retried once the request was sent, and a stream is never
moved once its first byte has gone to the client: a stream that breaks off ends with an
error event (``data: {"error": {...}}``), which OpenAI's SDK raises as ``APIError``.

The client is aiohttp: on loopback it takes about half of httpx's time per request
(measured for bench/router_bench.py), and the router pays that on every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from airoboros import telemetry
from airoboros.errors import ApiError, BadGateway, ServiceUnavailable
from airoboros.protocol import error_body

log = logging.getLogger(__name__)

#: headers of a backend's answer that travel on to the client
PASS_HEADERS = ("retry-after", "retry-after-ms", "x-request-id", "openai-processing-ms")
_DONE = b"data: [DONE]"


@dataclass
class BackendPod:
    """One OpenAI-compatible server; ``url`` is its API base (ending in ``/v1``)."""

    url: str
    healthy: bool = True
    #: models (adapters) it serves, from its /v1/models and its answers; None: unknown
    models: frozenset[str] | None = None
    #: of those, the base models: listed with ``parent: null`` (inference, vLLM), where
    #: an adapter names its base as its parent
    bases: frozenset[str] = frozenset()
    #: requests in flight through this router
    outstanding: int = 0
    checked_at: float = 0.0
    failed_at: float = 0.0
    error: str = ""

    @property
    def root(self) -> str:
        return self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url

    @property
    def adapters(self) -> list[str]:
        """The adapters it holds (or answered for), base models left out."""
        return sorted((self.models or frozenset()) - self.bases)

    def holds(self, model: str | None) -> bool:
        return model is not None and self.models is not None and model in self.models

    def learn(self, model: str) -> None:
        if not self.holds(model):
            self.models = frozenset({*(self.models or ()), model})


def api_base(url: str) -> str:
    """``http://pod:8000`` and ``http://pod:8000/v1/`` both give ``http://pod:8000/v1``."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    return url if url.endswith("/v1") else f"{url}/v1"


@dataclass
class BackendReply:
    """A complete (non-streamed) answer of a backend."""

    status: int
    content: bytes
    headers: dict[str, str] = field(default_factory=dict)
    backend: str = ""

    def json(self) -> Any:
        return json.loads(self.content)


def normalise_error(status: int, content: bytes) -> dict[str, Any]:
    """A backend's error body in OpenAI's envelope, whatever its shape: OpenAI's and
    vLLM's (``{"error": {...}}``, code may be an int), TGI's and LoRAX's
    (``{"error": "...", "error_type": "..."}``), FastAPI's (``{"detail": ...}``), text."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    try:
        data: Any = json.loads(content)
    except ValueError:
        text = content.decode("utf-8", errors="replace").strip()
        return error_body(text[:1000] or f"backend answered HTTP {status}", kind)
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            return error_body(
                str(err.get("message") or f"backend answered HTTP {status}"),
                str(err.get("type") or kind),
                None if err.get("code") is None else str(err.get("code")),
                None if err.get("param") is None else str(err.get("param")),
            )
        if isinstance(err, str):
            return error_body(err, str(data.get("error_type") or kind))
        if "detail" in data:
            detail = data["detail"]
            message = detail if isinstance(detail, str) else json.dumps(detail)[:1000]
            return error_body(message, kind)
        if isinstance(data.get("message"), str):
            return error_body(data["message"], kind)
    return error_body(json.dumps(data)[:1000], kind)


def _pass_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {h: headers[h] for h in PASS_HEADERS if h in headers}


def _event_end(buf: bytes) -> int:
    """Where the last complete server-sent event of ``buf`` ends (0: none is complete);
    events end with a blank line, ``\\n\\n`` or ``\\r\\n\\r\\n``."""
    ends = [i + len(sep) for sep in (b"\n\n", b"\r\n\r\n") if (i := buf.rfind(sep)) >= 0]
    return max(ends, default=0)


def _broken(exc: BaseException) -> BadGateway:
    """The error for a request that reached a pod and then failed: never retried, as the
    pod may have acted on it."""
    if isinstance(exc, TimeoutError):
        return BadGateway(
            f"the backend did not answer in time ({type(exc).__name__})",
            status=504,
            code="backend_timeout",
        )
    return BadGateway(f"the backend failed while answering ({type(exc).__name__}: {exc})")


def _sse_error(message: str, code: str) -> bytes:
    body = error_body(message, "server_error", code)
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class Stream:
    """An answer being streamed: status and headers are known, the events follow. Iterate
    ``events()`` once; ``aclose()`` (idempotent) releases the connection and the pod's
    in-flight slot, whether or not the events were read."""

    def __init__(
        self,
        backend: BackendPod,
        status: int,
        headers: Mapping[str, str],
        chunks: AsyncIterator[bytes],
        release: Callable[[], Awaitable[None] | None],
    ) -> None:
        self.backend = backend
        self.status = status
        self.headers = _pass_headers(headers)
        self.media_type = headers.get("content-type", "text/event-stream").split(";")[0]
        self._chunks = chunks
        self._release = release
        self._closed = False

    @classmethod
    def of(cls, backend: BackendPod, resp: aiohttp.ClientResponse) -> Stream:
        return cls(backend, resp.status, resp.headers, resp.content.iter_any(), resp.release)

    async def events(self) -> AsyncIterator[bytes]:
        """The backend's bytes, cut at event boundaries (a blank line) so that an error
        event can always follow what was sent; each event goes on as soon as it is whole."""
        buf = b""
        done = False
        try:
            async for chunk in self._chunks:
                buf += chunk
                cut = _event_end(buf)
                if cut:
                    out, buf = buf[:cut], buf[cut:]
                    done = done or _DONE in out
                    yield out
            if buf.strip() and not done:
                # Ended inside an event: drop the torn event, say so.
                yield _sse_error(
                    f"the backend's stream ended in the middle of an event ({self.backend.url})",
                    "backend_stream_error",
                )
            elif buf:
                yield buf
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning(
                "stream from %s broke off: %s: %s", self.backend.url, type(exc).__name__, exc
            )
            yield _sse_error(
                f"the backend's stream broke off ({type(exc).__name__}); the answer is incomplete",
                "backend_stream_error",
            )
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.backend.outstanding -= 1
        with contextlib.suppress(Exception):
            done = self._release()
            if done is not None:
                await done


class BackendPool:
    """The backends and how requests are spread over them (see the module's docstring)."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        api_key: str | None = None,
        connect_timeout: float = 3.0,
        read_timeout: float = 600.0,
        health_interval: float = 10.0,
        affinity_slack: int = 8,
    ) -> None:
        self.backends = [BackendPod(api_base(u)) for u in dict.fromkeys(urls)]
        #: connect: a free connection and the TCP connect; sock_read: between two reads
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None
        self.api_key = api_key
        self.health_interval = health_interval
        self.health_timeout = min(5.0, max(health_interval, 0.5))
        self.affinity_slack = affinity_slack
        self._turn = 0
        self._loop_task: asyncio.Task[None] | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Check every backend once, then keep checking every ``health_interval``."""
        await self.refresh()
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._health_loop())

    @property
    def session(self) -> aiohttp.ClientSession:
        """The connection pool, made on first use (inside the event loop, as aiohttp wants)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                # Idle connections go before a uvicorn backend drops them (5 s): a POST on a
                # connection the pod has just closed would fail after being sent.
                connector=aiohttp.TCPConnector(limit=1000, limit_per_host=0, keepalive_timeout=4),
                timeout=self.timeout,
            )
        return self._session

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                await self.refresh()
            except Exception:  # a check must never end the loop
                log.exception("backend health check failed")

    # --- health -----------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        h = {"content-type": "application/json"}
        if self.api_key:
            h["authorization"] = f"Bearer {self.api_key}"
        return h

    async def refresh(self) -> None:
        await asyncio.gather(*(self.check(b) for b in self.backends))

    async def check(self, b: BackendPod) -> None:
        """``GET /v1/models`` (healthy, and the models it serves); servers without that
        route (LoRAX) are asked ``/health`` or ``/healthz`` and their models stay unknown."""
        timeout = aiohttp.ClientTimeout(total=self.health_timeout)
        try:
            async with self.session.get(
                f"{b.url}/models", headers=self._headers(), timeout=timeout
            ) as resp:
                status = resp.status
                body = await resp.read()
            if status == 200:
                data = json.loads(body).get("data", [])
                cards = [m for m in data if isinstance(m, dict) and "id" in m]
                models = frozenset(str(m["id"]) for m in cards)
                # Keep what it answered for since (an adapter loaded on demand) only if the
                # pod does not list adapters itself.
                b.models = models if models else b.models
                if models:
                    b.bases = frozenset(
                        str(m["id"]) for m in cards if "parent" in m and m["parent"] is None
                    )
                self._mark(b, True)
                return
            if status in (404, 405):
                for path in ("/health", "/healthz"):
                    async with self.session.get(f"{b.root}{path}", timeout=timeout) as r:
                        if r.status == 200:
                            self._mark(b, True)
                            return
            if status in (401, 403):
                # Up, but our key is refused: requests will say so to the client.
                log.error("backend %s refuses the router's key (HTTP %d)", b.url, status)
                self._mark(b, True)
                return
            self._mark(b, False, f"HTTP {status}")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._mark(b, False, f"{type(exc).__name__}: {exc}")

    def _mark(self, b: BackendPod, healthy: bool, error: str = "") -> None:
        now = time.monotonic()
        if healthy != b.healthy:
            if healthy:
                log.info("backend %s is healthy", b.url)
            else:
                log.warning("backend %s is unhealthy: %s", b.url, error)
        b.healthy = healthy
        b.checked_at = now
        b.error = error
        if not healthy:
            b.failed_at = now

    # --- choosing -----------------------------------------------------------------------------

    def models(self) -> set[str]:
        """Every model some backend says it serves."""
        return {m for b in self.backends for m in (b.models or ())}

    def order(self, model: str | None) -> list[BackendPod]:
        """The pods to try for ``model``, best first."""
        if not self.backends:
            return []
        pool = [b for b in self.backends if b.healthy]
        if not pool:
            # Nothing known to be healthy: the checks may be stale, so try them all, the
            # longest-failed first.
            pool = sorted(self.backends, key=lambda b: b.failed_at)
        least = min(b.outstanding for b in pool)
        self._turn += 1
        n = len(self.backends)
        position = {id(b): i for i, b in enumerate(self.backends)}

        def key(b: BackendPod) -> tuple[bool, int, int]:
            preferred = b.holds(model) and b.outstanding <= least + self.affinity_slack
            return (not preferred, b.outstanding, (position[id(b)] - self._turn) % n)

        return sorted(pool, key=key)

    # --- forwarding ---------------------------------------------------------------------------

    async def _send(
        self, path: str, body: bytes, model: str | None
    ) -> tuple[BackendPod, aiohttp.ClientResponse]:
        """Open the request on the first pod that takes it. Returns with the answer's
        status and headers read (not its body), the pod's in-flight count raised by one.
        Raises ``ServiceUnavailable`` when no pod could be reached."""
        tried: list[str] = []
        last_503: tuple[bytes, str] | None = None
        for b in self.order(model):
            b.outstanding += 1
            try:
                # The trace goes on to the pod (W3C traceparent).
                headers = telemetry.inject(self._headers())
                resp = await self.session.post(f"{b.url}{path}", data=body, headers=headers)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                # The request never left (no connection, or none free in time): safe to
                # give it to another pod.
                b.outstanding -= 1
                self._mark(b, False, f"{type(exc).__name__}: {exc}")
                tried.append(f"{b.url} ({type(exc).__name__})")
                continue
            except (aiohttp.ClientError, TimeoutError) as exc:
                b.outstanding -= 1
                raise _broken(exc) from None
            if resp.status == 503:
                # Starting, draining or overloaded: the next pod may take it.
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    last_503 = (await resp.read(), resp.headers.get("retry-after", "1"))
                resp.release()
                b.outstanding -= 1
                tried.append(f"{b.url} (HTTP 503)")
                continue
            return b, resp
        if last_503 is not None:
            env = normalise_error(503, last_503[0])["error"]
            raise ServiceUnavailable(
                f"every backend is unavailable: {env['message']}",
                headers={"retry-after": last_503[1]},
            )
        where = "; ".join(tried) or "no backends configured (AIROBOROS_BACKENDS)"
        raise ServiceUnavailable(
            f"no backend could be reached: {where}", headers={"retry-after": "1"}
        )

    def _fail(self, status: int, content: bytes, headers: dict[str, str]) -> ApiError:
        """A backend's error answer as the error the client gets: 4xx passed through in
        OpenAI's envelope, 5xx as 502."""
        env = normalise_error(status, content)["error"]
        if status < 500:
            return ApiError(
                env["message"],
                status=status,
                type=env["type"],
                code=env["code"],
                param=env["param"],
                headers=headers,
            )
        return BadGateway(f"the backend failed (HTTP {status}): {env['message']}", headers=headers)

    async def post(self, path: str, body: bytes, model: str | None) -> BackendReply:
        """POST ``body`` to ``path`` (``/chat/completions``, ``/completions``) on the best
        pod for ``model``; the whole answer. Raises ``ApiError`` for error answers."""
        b, resp = await self._send(path, body, model)
        try:
            content = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _broken(exc) from None
        finally:
            resp.release()
            b.outstanding -= 1
        headers = _pass_headers(resp.headers)
        if resp.status >= 400:
            raise self._fail(resp.status, content, headers)
        if model is not None:
            b.learn(model)
        return BackendReply(resp.status, content, headers, b.url)

    async def open_stream(self, path: str, body: bytes, model: str | None) -> Stream:
        """Like ``post`` for ``stream: true``: returns once the pod has answered with a
        success status (or raises with its error, nothing having been streamed)."""
        b, resp = await self._send(path, body, model)
        stream = Stream.of(b, resp)
        if resp.status >= 400:
            try:
                content = await resp.read()
            except (aiohttp.ClientError, TimeoutError):
                content = b""
            await stream.aclose()
            raise self._fail(resp.status, content, stream.headers)
        if model is not None:
            b.learn(model)
        return stream

    async def complete_json(self, body: dict[str, Any]) -> dict[str, Any]:
        """A chat completion (not streamed) for the router's own use (agent routing)."""
        reply = await self.post("/chat/completions", json.dumps(body).encode(), body.get("model"))
        data = reply.json()
        if not isinstance(data, dict):
            raise BadGateway("the backend's answer is not a JSON object")
        return data
