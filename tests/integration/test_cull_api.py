"""POST /v1/jobs/{id}/cull on the topics API over the embedded backends (SQLite, the
in-process bus, a local folder), the real embedder and the scripted judge: a finished
job's rows culled into a new job, 404/409/422, and a cull resumed after its task died."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from airoboros.bus import InMemoryBus
from airoboros.config import parse_config
from airoboros.contracts import Item
from airoboros.objects import LocalObjectStore
from airoboros.settings import TopicsSettings
from airoboros.store import SqlStore
from airoboros.topics.app import create_app
from airoboros.topics.service import TopicsService
from airoboros.web import key_owner

KEY = "test-key-1"
SOURCE = "job-to-cull"
ROWS = [
    Item(instruction="What is the capital of France?", response="Paris.", category="general"),
    Item(
        instruction="What's the capital city of France?",
        response="Paris is the capital city of France.",
        category="general",
    ),
    Item(
        instruction="A chat.\nUSER: hi",
        response="BADANSWER hello",
        category="rp",
        skip_prompt_formatting=True,
    ),
    Item(instruction="Tell me a joke about cats.", response="BADANSWER meow", category="joke"),
    Item(instruction="Why is the sky blue?", response="Rayleigh scattering.", category="general"),
    Item(instruction="What is 17 times 3?", response="51.", category="reasoning_or_math"),
]
KEPT = [
    {
        "instruction": "What's the capital city of France?",
        "response": "Paris is the capital city of France.",
        "category": "general",
    },
    {
        "instruction": "A chat.\nUSER: hi",
        "response": "BADANSWER hello",
        "category": "rp",
        "skip_prompt_formatting": True,
    },
    {
        "instruction": "Why is the sky blue?",
        "response": "Rayleigh scattering.",
        "category": "general",
    },
    {"instruction": "What is 17 times 3?", "response": "51.", "category": "orca"},
]


class Env:
    def __init__(self, svc: TopicsService, client: httpx.AsyncClient) -> None:
        self.svc = svc
        self.client = client


@pytest.fixture
async def env(tmp_path: Path, llm_server: Any, embedder: Any) -> AsyncIterator[Env]:
    srv = llm_server(latency=0.05)
    # The job names the scripted server as its endpoint: the operator allows it.
    settings = TopicsSettings(api_keys=KEY, allowed_base_urls=srv.base_url)
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'store.sqlite'}")
    await store.connect()
    svc = TopicsService(settings, store, InMemoryBus(), LocalObjectStore(tmp_path / "objects"))
    svc.culls.embedder = embedder
    cfg = parse_config(
        {
            "model": "gpt-4",
            "base_url": srv.base_url,
            "request_timeout": 10,
            "max_retry_time": 5,
            "judge": {"batch_size": 1},
            "instructors": {"general": {"count": 10}},
        }
    )
    await store.jobs.ensure(
        SOURCE, config=cfg.model_dump(mode="json"), targets={"general": 10}, owner=key_owner(KEY)
    )
    await store.rows.add(SOURCE, [(f"src-{i}", r) for i, r in enumerate(ROWS)], cap=False)
    await store.jobs.set_status(SOURCE, "done")
    app = create_app(settings, service=svc)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://topics",
        headers={"authorization": f"Bearer {KEY}"},
    ) as c:
        yield Env(svc, c)
    for task in list(svc.culls.tasks.values()):
        task.cancel()
    await store.close()


async def items(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    r = await client.get(f"/v1/jobs/{job_id}/items")
    assert r.status_code == 200, r.text
    return [{k: v for k, v in row.items() if k not in ("seq", "bad")} for row in r.json()["items"]]


async def test_cull_a_finished_job_into_a_new_one(env: Env) -> None:
    r = await env.client.post(f"/v1/jobs/{SOURCE}/cull", json={"threshold": 90})
    assert r.status_code == 201, r.text
    body = r.json()
    job_id = body["id"]
    assert body["cull_of"] == SOURCE and body["status"] == "running"
    await env.svc.culls.wait(job_id)

    status = (await env.client.get(f"/v1/jobs/{job_id}")).json()
    assert status["status"] == "done", status
    assert status["rows"] == len(KEPT)
    assert "kept 3, dropped 2, passed through 1" in status["detail"]
    assert status["instructors"]["cull"]["prompt_tokens"] > 0
    assert await items(env.client, job_id) == KEPT
    export = await env.client.get(f"/v1/jobs/{job_id}/export")
    assert [json.loads(x) for x in export.text.splitlines()] == KEPT
    # The source job is untouched.
    assert len(await items(env.client, SOURCE)) == len(ROWS)


async def test_rows_marked_bad_are_not_culled(env: Env) -> None:
    r = await env.client.get(f"/v1/jobs/{SOURCE}/items", params={"q": "SKY BLUE"})
    [sky] = r.json()["items"]
    r = await env.client.post(f"/v1/jobs/{SOURCE}/items/{sky['seq']}/bad", json={"bad": True})
    assert r.status_code == 200, r.text
    r = await env.client.post(f"/v1/jobs/{SOURCE}/cull", json={"threshold": 90})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    await env.svc.culls.wait(job_id)
    assert await items(env.client, job_id) == [k for k in KEPT if "sky" not in k["instruction"]]
    # The source job keeps the row (marked).
    assert len(await items(env.client, SOURCE)) == len(ROWS)


async def test_unknown_unfinished_and_bad_body(env: Env) -> None:
    r = await env.client.post("/v1/jobs/nope/cull")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    await env.svc.store.jobs.set_status(SOURCE, "running")
    r = await env.client.post(f"/v1/jobs/{SOURCE}/cull")
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "job_not_finished"
    assert "running" in r.json()["error"]["message"]
    await env.svc.store.jobs.set_status(SOURCE, "done")
    r = await env.client.post(f"/v1/jobs/{SOURCE}/cull", json={"threshold": 101})
    assert r.status_code == 422, r.text
    r = await env.client.post(f"/v1/jobs/{SOURCE}/cull", json={"treshold": 90})
    assert r.status_code == 422, r.text


async def test_a_cull_whose_task_died_is_resumed_by_the_next_tick(env: Env) -> None:
    from airoboros.topics.cull import ledger as cull_mod

    saved: list[int] = []
    real_save = cull_mod.StoreLedger.save

    async def save_each(self: Any) -> None:
        await real_save(self)
        saved.append(self.committed)

    cull_mod.StoreLedger.save = save_each  # type: ignore[method-assign]
    real_init = cull_mod.StoreLedger.__init__

    def init(self: Any, *a: Any, **kw: Any) -> None:
        real_init(self, *a, **kw)
        self.save_every = 0.0  # save after every decision

    cull_mod.StoreLedger.__init__ = init  # type: ignore[method-assign]
    try:
        r = await env.client.post(f"/v1/jobs/{SOURCE}/cull")
        job_id = r.json()["id"]
        for _ in range(400):
            if len(saved) >= 2:
                break
            await asyncio.sleep(0.01)
        task = env.svc.culls.tasks[job_id]
        task.cancel()  # the replica "dies" mid-run
        await asyncio.gather(task, return_exceptions=True)
        assert (await env.svc.store.jobs.get(job_id)).status == "running"
        assert await env.svc.store.rows.count(job_id) < len(KEPT)

        await env.svc.tick_all()  # finds the running job without a task, and resumes it
        await env.svc.culls.wait(job_id)
    finally:
        cull_mod.StoreLedger.save = real_save  # type: ignore[method-assign]
        cull_mod.StoreLedger.__init__ = real_init  # type: ignore[method-assign]
    assert (await env.svc.store.jobs.get(job_id)).status == "done"
    assert await items(env.client, job_id) == KEPT
