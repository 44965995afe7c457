"""GET /v1/jobs/{id}/export on the topics API, every format, over the embedded backends
(SQLite, the in-process bus, a local folder): no broker or database server needed."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from airoboros.bus import InMemoryBus
from airoboros.contracts import Item
from airoboros.exports import FORMATS, to_alpaca, to_openai, to_sharegpt
from airoboros.objects import LocalObjectStore
from airoboros.settings import TopicsSettings
from airoboros.store import SqlStore
from airoboros.topics.app import create_app
from airoboros.topics.service import TopicsService
from airoboros.web import key_owner

KEY = "test-key-1"
JOB = "job-export-1"
ROWS = [
    Item(instruction="What is 2+2?", response="4", category="general"),
    Item(instruction="Who?", response="Me.", category="trivia", system="Be brief."),
    Item(
        instruction="BEGININPUT\nBEGINCONTEXT\nENDCONTEXT\nSky is green.\nENDINPUT\n"
        "BEGININSTRUCTION\nWhat colour is the sky?\nENDINSTRUCTION",
        response="Green.",
        category="contextual",
    ),
    Item(
        instruction="A chat between Zora and Emily.\nDescription of Zora:\nA pilot.\n\n"
        "Emily: Hi?\nZora: Hello.\nEmily: Fly today?",
        response="Zora: Always.",
        category="gtkm",
        skip_prompt_formatting=True,
    ),
]


@pytest.fixture
async def client(tmp_path) -> AsyncIterator[httpx.AsyncClient]:
    settings = TopicsSettings(api_keys=KEY)
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'store.sqlite'}")
    await store.connect()
    svc = TopicsService(settings, store, InMemoryBus(), LocalObjectStore(tmp_path / "objects"))
    # Owned by the key the client sends: a job is seen by the key that created it.
    await store.jobs.ensure(
        JOB, config={}, targets={r.category: 10 for r in ROWS}, owner=key_owner(KEY)
    )
    await store.rows.add(JOB, [(f"src-{i}", r) for i, r in enumerate(ROWS)], cap=False)
    app = create_app(settings, service=svc)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://topics",
        headers={"authorization": f"Bearer {KEY}"},
    ) as c:
        yield c
    await store.close()


def lines(r: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(x) for x in r.text.splitlines() if x]


async def test_jsonl_formats(client):
    expected = {
        "airoboros": [r.to_row() for r in ROWS],
        "sharegpt": [to_sharegpt(r) for r in ROWS],
        "alpaca": [to_alpaca(r) for r in ROWS],
        "openai": [to_openai(r) for r in ROWS],
    }
    for fmt, rows in expected.items():
        r = await client.get(f"/v1/jobs/{JOB}/export", params={"format": fmt})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/jsonl")
        name = f"{JOB}.jsonl" if fmt == "airoboros" else f"{JOB}.{fmt}.jsonl"
        assert r.headers["content-disposition"] == f'attachment; filename="{name}"'
        assert lines(r) == rows, fmt


async def test_default_and_legacy_jsonl(client):
    default = await client.get(f"/v1/jobs/{JOB}/export")
    legacy = await client.get(f"/v1/jobs/{JOB}/export", params={"format": "jsonl"})
    assert default.status_code == legacy.status_code == 200
    assert lines(default) == lines(legacy) == [r.to_row() for r in ROWS]


async def test_parquet(client):
    import pyarrow.parquet as pq

    r = await client.get(f"/v1/jobs/{JOB}/export", params={"format": "parquet"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/vnd.apache.parquet"
    assert r.headers["content-disposition"] == f'attachment; filename="{JOB}.parquet"'
    table = pq.read_table(io.BytesIO(r.content))
    assert table.num_rows == len(ROWS)
    assert table.column("system").to_pylist() == [None, "Be brief.", None, None]
    assert table.column("skip_prompt_formatting").to_pylist() == [False, False, False, True]


async def test_unknown_format_and_unknown_job(client):
    r = await client.get(f"/v1/jobs/{JOB}/export", params={"format": "csv"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["code"] == "unknown_format"
    assert "'csv'" in err["message"]
    assert all(f in err["message"] for f in FORMATS)

    r = await client.get("/v1/jobs/nope/export", params={"format": "sharegpt"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"

    r = await client.get(f"/v1/jobs/{JOB}/export", headers={"authorization": "Bearer x"})
    assert r.status_code == 401
