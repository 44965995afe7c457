"""The web console's static files on the topics app: served at /console/ without a key
(they hold no data), with headers that keep the pages to their own origin, and shipped
as package data (an installed service has them)."""

from __future__ import annotations

import re
import tomllib
from collections.abc import AsyncIterator
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest

from airoboros.settings import TopicsSettings
from airoboros.topics.app import create_app
from airoboros.topics.console_files import CONSOLE_DIR

REPO = Path(__file__).resolve().parents[2]
KEY = "test-key-1"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    # The files need no service: a stand-in keeps the lifespan from connecting anything.
    app = create_app(TopicsSettings(api_keys=KEY), service=object())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://topics"
    ) as c:
        yield c


def assert_locked_down(r: httpx.Response) -> None:
    csp = r.headers["content-security-policy"]
    directives = {d.split()[0]: d.split()[1:] for d in csp.split("; ")}
    assert directives["default-src"] == ["'self'"]
    assert directives["script-src"] == ["'self'"]  # no inline script, no eval
    assert directives["frame-ancestors"] == ["'none'"]
    assert not any("unsafe" in v for vs in directives.values() for v in vs)
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"


async def test_the_console_is_served_without_a_key_with_its_headers(
    client: httpx.AsyncClient,
) -> None:
    r = await client.get("/console")
    assert r.status_code in (301, 307, 308)
    assert r.headers["location"] == "/console/"

    r = await client.get("/console/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="app.js"></script>' in r.text
    assert_locked_down(r)

    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        r = await client.get(f"/console/{name}")
        assert r.status_code == 200, name
        assert kind in r.headers["content-type"], name
        assert_locked_down(r)


async def test_unknown_files_and_escapes_are_404_and_the_api_still_needs_the_key(
    client: httpx.AsyncClient,
) -> None:
    for path in ("/console/nope.js", "/console/../app.py", "/console/%2e%2e/app.py"):
        r = await client.get(path)
        assert r.status_code == 404, path
        assert "create_app" not in r.text
    r = await client.get("/console/nope.js")
    assert_locked_down(r)
    assert (await client.get("/v1/jobs")).status_code == 401


def test_pages_have_no_inline_script_and_load_nothing_from_elsewhere() -> None:
    html = (CONSOLE_DIR / "index.html").read_text()
    # Every <script> is an external file of the console (the CSP would block the rest).
    for body in re.findall(r"<script\b[^>]*>(.*?)</script>", html, flags=re.S):
        assert body.strip() == ""
    assert not re.search(r"\son[a-z]+\s*=", html)  # no inline handlers
    for ref in re.findall(r"\b(?:src|href)=\"([^\"]*)\"", html):
        assert not re.match(r"[a-z]+://|//", ref), ref  # the origin's own files only
    css = (CONSOLE_DIR / "style.css").read_text()
    assert "@import" not in css and not re.search(r"url\(\s*['\"]?(https?:)?//", css)
    for f in CONSOLE_DIR.glob("*.js"):
        text = f.read_text()
        for spec in re.findall(r"^import .* from \"([^\"]+)\";", text, flags=re.M):
            assert spec.startswith("./"), (f.name, spec)
        assert not re.search(r"fetch\(\s*[\"'`](https?:)?//", text), f.name
        assert not re.search(
            r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|\beval\(|new Function\(", text
        ), f.name
        assert "console.log" not in text, f.name  # nothing (the key least of all) is logged


def test_every_console_file_is_package_data() -> None:
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = conf["tool"]["setuptools"]["package-data"]["airoboros.topics"]
    files = sorted(p.relative_to(CONSOLE_DIR.parent).as_posix() for p in CONSOLE_DIR.iterdir())
    assert {"console/index.html", "console/app.js", "console/style.css"} <= set(files)
    for f in files:
        assert any(fnmatch(f, g) for g in globs), f
