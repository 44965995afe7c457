"""The web console's static files (services/topics/console/), served at ``/console/``.

The files hold no data, so they need no key; every data call the console makes sends the
key the person entered as ``Authorization: Bearer`` (docs/console.md). Each answer carries
headers that keep the pages to their own origin: a Content-Security-Policy of
``default-src 'self'`` with no inline script and no eval, no framing, no MIME sniffing and
no Referer (a hash route names a job).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

#: where the files are, in the tree and in an installed package (package data)
CONSOLE_DIR = Path(__file__).resolve().parent / "console"

#: the policy of every console answer; connect-src 'self': the console talks to its own
#: origin only (the playground reaches the router through the topics service)
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    # The files change with the release: revalidate (an ETag answers 304) rather than run
    # an old app.js against a new API.
    "cache-control": "no-cache",
}


class ConsoleFiles(StaticFiles):
    """StaticFiles (ETag, HEAD, index.html for the folder) with the console's headers on
    every answer, 404s included."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        try:
            response = await super().get_response(path, scope)
        except Exception as exc:  # starlette raises HTTPException for a 404
            from starlette.exceptions import HTTPException

            if not isinstance(exc, HTTPException):
                raise
            response = Response("not found", status_code=exc.status_code, media_type="text/plain")
        response.headers.update(SECURITY_HEADERS)
        return response


def mount_console(app: FastAPI, directory: Path = CONSOLE_DIR) -> None:
    """``/console/`` serves the console; ``/console`` redirects there."""

    @app.get("/console", include_in_schema=False)
    async def console_root() -> Any:
        return RedirectResponse("/console/", status_code=308, headers=SECURITY_HEADERS)

    app.mount("/console", ConsoleFiles(directory=directory, html=True), name="console")
