"""A minimal, fast OpenAI-compatible backend (raw ASGI, no framework) for the router's tests
and bench: ``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions``, streamed
(SSE, one event per chunk, then ``data: [DONE]``) or not, for any of its ``models``.

Markers in the prompt script a request's fate: ``FAIL_MIDWAY`` (the stream breaks off after
two chunks: the connection drops without the end of the body), ``BACKEND_400`` (a 400 in
TGI's error shape), ``BACKEND_500``, ``BACKEND_503``.

    python -m tests.fakes.openai_backend --port 8090 --models code,cooking
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from tests.fakes.asgi_server import AppServer

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class MidwayFailure(RuntimeError):
    """Raised inside a stream on purpose: the server drops the connection."""


class FakeBackend:
    def __init__(
        self,
        models: tuple[str, ...] = ("test-model",),
        *,
        chunks: int = 5,
        chunk_delay: float = 0.0,
        name: str = "backend",
        accept_any: bool = False,
        replies: dict[str, str] | None = None,
    ) -> None:
        self.models = models
        #: answer for models it does not list too (an inference pod loading adapters on demand)
        self.accept_any = accept_any
        #: model -> the fixed text it answers (e.g. the function expert's choice)
        self.replies = dict(replies or {})
        self.chunks = chunks
        self.chunk_delay = chunk_delay
        self.name = name
        #: (path, body) of every completion request
        self.requests: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/v1/models":
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": self.name}
                for m in self.models
            ]
            return await self._json(send, 200, {"object": "list", "data": data})
        if method == "GET" and path in ("/health", "/healthz"):
            return await self._json(send, 200, {"status": "ok"})
        if method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            body = b""
            while True:
                msg = await receive()
                body += msg.get("body", b"")
                if not msg.get("more_body"):
                    break
            return await self._complete(send, path, json.loads(body))
        return await self._json(
            send, 404, {"error": {"message": "no such route", "type": "invalid_request_error"}}
        )

    async def _json(self, send: Send, status: int, data: Any) -> None:
        body = json.dumps(data).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _complete(self, send: Send, path: str, body: dict[str, Any]) -> None:
        self.requests.append((path, body))
        chat = path.endswith("/chat/completions")
        model = str(body.get("model"))
        prompt = (
            " ".join(str(m.get("content", "")) for m in body.get("messages", []))
            if chat
            else str(body.get("prompt", ""))
        )
        if "BACKEND_400" in prompt:
            return await self._json(
                send, 400, {"error": "Input validation error: bad", "error_type": "validation"}
            )
        if "BACKEND_500" in prompt:
            return await self._json(
                send, 500, {"error": {"message": "kaput", "type": "server_error"}}
            )
        if "BACKEND_503" in prompt:
            return await self._json(
                send, 503, {"error": {"message": "overloaded", "type": "server_error"}}
            )
        if model not in self.models and not self.accept_any:
            return await self._json(
                send,
                404,
                {
                    "error": {
                        "message": f"The model `{model}` does not exist",
                        "type": "invalid_request_error",
                        "code": "model_not_found",
                    }
                },
            )
        base = [model, "answers", "from", self.name]
        words = (base + [f"part{i}" for i in range(self.chunks)])[: max(1, self.chunks)]
        if model in self.replies:
            words = [self.replies[model]]
        created = int(time.time())
        if not body.get("stream"):
            text = " ".join(words)
            choice: dict[str, Any] = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
                if chat
                else {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
            )
            return await self._json(
                send,
                200,
                {
                    "id": "cmpl-1",
                    "object": "chat.completion" if chat else "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": {
                        "prompt_tokens": 3,
                        "completion_tokens": len(words),
                        "total_tokens": 3 + len(words),
                    },
                },
            )
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        for i, w in enumerate(words):
            if i == 2 and "FAIL_MIDWAY" in prompt:
                raise MidwayFailure("scripted failure in the middle of a stream")
            delta: dict[str, Any] = (
                {"index": 0, "delta": {"content": w + " "}, "finish_reason": None}
                if chat
                else {"index": 0, "text": w + " ", "finish_reason": None, "logprobs": None}
            )
            chunk = {
                "id": "cmpl-1",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": model,
                "choices": [delta],
            }
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: " + json.dumps(chunk).encode() + b"\n\n",
                    "more_body": True,
                }
            )
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


class BackendThread(AppServer):
    """Runs an ASGI app under uvicorn in a background thread on a free loopback port."""

    def __init__(self, app: Any, port: int = 0) -> None:
        super().__init__(
            app,
            port=port,
            start_timeout=30,
            log_level="critical",
            lifespan="on",
            timeout_keep_alive=30,
        )


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--models", default="test-model")
    p.add_argument("--chunks", type=int, default=5)
    args = p.parse_args()
    app = FakeBackend(tuple(m for m in args.models.split(",") if m), chunks=args.chunks)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
