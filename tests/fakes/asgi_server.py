"""Run any ASGI app (FastAPI) under uvicorn in a background thread on a free loopback
port, lifespan included: ``with AppServer(app) as srv: httpx.get(srv.url + "/...")``."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any


class AppServer:
    def __init__(
        self,
        app: Any,
        *,
        port: int = 0,
        start_timeout: float = 60.0,
        log_level: str = "warning",
        lifespan: str = "auto",
        timeout_keep_alive: int = 5,
    ) -> None:
        import uvicorn

        self.app = app
        self.start_timeout = start_timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port = int(self.sock.getsockname()[1])
        config = uvicorn.Config(
            app, log_level=log_level, lifespan=lifespan, timeout_keep_alive=timeout_keep_alive
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw: Any) -> Any:
        """An ``openai.OpenAI`` client on this server's /v1, without retries."""
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="k", max_retries=0, **kw)

    def aclient(self, **kw: Any) -> Any:
        import openai

        kw.setdefault("timeout", 120)
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="k", max_retries=0, **kw)

    def __enter__(self) -> AppServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise RuntimeError("the server did not start (see its log above)")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
