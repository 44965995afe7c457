"""A minimal HTTP server for queue workers: the health probes (/healthz, /readyz) and
the Prometheus metrics (/metrics).

Workers have no web framework; this answers those three routes and 404 otherwise.

/readyz asks ``ready`` at each probe: a plain callable returning a bool, or an async one
(e.g. ``airoboros.worker.dependencies_ready``, which asks the broker and the database).
An async check gets ``check_timeout`` seconds; one that takes longer, or raises, means
not ready (503), so a probe never hangs on a dependency that does not answer.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

#: Seconds a readiness check may take before the probe answers 503.
READY_CHECK_TIMEOUT = 3.0

ReadyCheck = Callable[[], bool | Awaitable[bool]]


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        ready: ReadyCheck,
        *,
        check_timeout: float = READY_CHECK_TIMEOUT,
    ) -> None:
        self.host = host
        self.port = port
        self.ready = ready
        self.check_timeout = check_timeout
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        # Port 0 asks for any free port: say which one it got.
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def is_ready(self) -> bool:
        """The answer of ``ready`` now: False when it raises or outlasts the timeout."""
        try:
            async with asyncio.timeout(self.check_timeout):
                result = self.ready()
                if inspect.isawaitable(result):
                    result = await result
                return bool(result)
        except TimeoutError:
            log.warning("readiness check took over %.1fs: not ready", self.check_timeout)
            return False
        except Exception as exc:
            log.warning("readiness check failed (%r): not ready", exc)
            return False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            parts = line.decode(errors="replace").split()
            path = parts[1] if len(parts) > 1 else ""
            # Drain the headers; probes send no body.
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (
                b"\r\n",
                b"\n",
                b"",
            ):
                pass
            ctype = "application/json"
            if path == "/healthz":
                status, body = "200 OK", b'{"status":"ok"}'
            elif path == "/metrics":
                from airoboros.metrics import exposition

                status = "200 OK"
                body, ctype = exposition()
            elif path == "/readyz":
                ok = await self.is_ready()
                status = "200 OK" if ok else "503 Service Unavailable"
                body = b'{"status":"ready"}' if ok else b'{"status":"not ready"}'
            else:
                status, body = "404 Not Found", b'{"error":{"message":"not found"}}'
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
