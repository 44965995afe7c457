"""A scripted OpenAI-compatible server with a hidden capacity: it answers at most
``capacity`` chat completions at once, each after a fixed ``latency``, and answers 429
at once to any request beyond that, with no ``x-ratelimit-*`` or Retry-After headers
(what vLLM, TGI or llama.cpp behind a queue limit look like to a client).

A raw ASGI app (no framework), so that hundreds of requests a second cost little CPU.
``GET /stats`` returns the counts; ``python -m tests.fakes.capacity_server --capacity 16``
runs it on its own (the AIMD benchmark does, so the server does not share the client's
interpreter).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from typing import Any

from tests.fakes.asgi_server import AppServer

_OK_BODY = {
    "id": "chatcmpl-capacity",
    "object": "chat.completion",
    "created": 0,
    "model": "test-model",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "A lighthouse keeps ships off rocks."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20},
}
_REJECT_BODY = {
    "error": {
        "message": "Server at capacity, try again later",
        "type": "server_busy",
        "code": "too_many_requests",
    }
}


class CapacityLLM:
    """The server's state: requests in flight, counts, and per-request times."""

    def __init__(self, capacity: int, latency: float) -> None:
        self.capacity = capacity
        self.latency = latency
        self.in_flight = 0
        #: the most requests answered at once (never above capacity)
        self.peak_in_flight = 0
        #: the most requests present at once, rejected ones included (what was offered)
        self.peak_offered = 0
        self.requests = 0
        self.admitted = 0
        self.rejected = 0
        #: monotonic time each admitted request was answered
        self.done_at: list[float] = []
        #: monotonic time and whether admitted, for every request
        self.arrivals: list[tuple[float, bool]] = []
        self._lock = threading.Lock()

    def stats(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "latency": self.latency,
            "requests": self.requests,
            "admitted": self.admitted,
            "rejected": self.rejected,
            "peak_in_flight": self.peak_in_flight,
            "peak_offered": self.peak_offered,
            "in_flight": self.in_flight,
        }

    def reset(self) -> None:
        with self._lock:
            self.requests = self.admitted = self.rejected = 0
            self.peak_in_flight = self.peak_offered = 0
            self.done_at.clear()
            self.arrivals.clear()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path, method = scope.get("path", ""), scope.get("method", "")
        # Drain the request body (the client waits for it to be read).
        more = True
        while more:
            msg = await receive()
            more = bool(msg.get("more_body"))
        if method == "GET" and path == "/stats":
            await _send_json(send, 200, self.stats())
            return
        if method == "POST" and path == "/reset":
            self.reset()
            await _send_json(send, 200, {"ok": True})
            return
        if method != "POST" or not path.endswith("/chat/completions"):
            await _send_json(send, 404, {"error": {"message": "not found", "code": "404"}})
            return
        with self._lock:
            self.requests += 1
            self.peak_offered = max(self.peak_offered, self.in_flight + 1)
            admitted = self.in_flight < self.capacity
            self.arrivals.append((time.monotonic(), admitted))
            if admitted:
                self.in_flight += 1
                self.admitted += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            else:
                self.rejected += 1
        if not admitted:
            await _send_json(send, 429, _REJECT_BODY)
            return
        try:
            await asyncio.sleep(self.latency)
        finally:
            with self._lock:
                self.in_flight -= 1
                self.done_at.append(time.monotonic())
        await _send_json(send, 200, _OK_BODY)


async def _send_json(send: Any, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class CapacityServer(AppServer):
    """``with CapacityServer(capacity=16, latency=0.05) as srv: ... srv.base_url``."""

    def __init__(self, capacity: int, latency: float, port: int = 0) -> None:
        self.llm = CapacityLLM(capacity, latency)
        super().__init__(
            self.llm, port=port, start_timeout=10, lifespan="off", timeout_keep_alive=30
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--capacity", type=int, default=16)
    p.add_argument("--latency", type=float, default=0.2)
    args = p.parse_args()
    uvicorn.run(
        CapacityLLM(args.capacity, args.latency),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        lifespan="off",
        timeout_keep_alive=30,
        access_log=False,
    )


if __name__ == "__main__":
    main()
