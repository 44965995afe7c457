"""A finished job's export while the object store is down: the job keeps its status with
its export pending, the export is retried until S3 is back (and the bucket made again when
it went missing), POST /v1/jobs/{id}/export reruns it. Real S3 API (moto's server)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from airoboros.bus import InMemoryBus
from airoboros.contracts import DatasetExported, Item
from airoboros.objects_s3 import S3ObjectStore
from airoboros.settings import TopicsSettings
from airoboros.store import SqlStore
from airoboros.topics.app import create_app
from airoboros.topics.service import TopicsService
from airoboros.web import key_owner
from tests.integration.services_harness import free_port

KEY = "k1"
JOB = "job-export"


class S3:
    """moto's S3 server on a fixed loopback port, stopped and started at will."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server: Any = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def s3() -> Iterator[S3]:
    s = S3()
    s.start()
    yield s
    s.stop()


async def setup(tmp_path: Path, s3: S3) -> tuple[TopicsService, list[DatasetExported]]:
    settings = TopicsSettings(api_keys=KEY)
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'store.sqlite'}")
    await store.connect()
    objects = S3ObjectStore(
        f"127.0.0.1:{s3.port}",
        "testing",
        "testing",
        "exports",
        secure=False,
        connect_timeout=1,
        max_retries=0,
    )
    bus = InMemoryBus()
    announced: list[DatasetExported] = []

    async def seen(msg: DatasetExported) -> None:
        announced.append(msg)

    bus.subscribe(DatasetExported, seen)
    await bus.start()
    svc = TopicsService(settings, store, bus, objects)
    await store.jobs.ensure(JOB, config={}, targets={"joke": 2}, owner=key_owner(KEY))
    await store.rows.add(
        JOB, [(f"r{i}", Item(instruction=f"q{i}", response="a", category="joke")) for i in range(2)]
    )
    await store.jobs.set_status(JOB, "done")
    return svc, announced


async def test_an_export_that_meets_s3_down_lands_once_s3_is_back(tmp_path: Path, s3: S3) -> None:
    svc, announced = await setup(tmp_path, s3)
    s3.stop()
    await svc.export_or_retry_later(JOB)  # what the controller runs when the job ends
    job = await svc.store.jobs.get(JOB)
    assert job.status == "done" and job.export_uri is None
    assert job.export_pending and "cannot reach" in (job.export_error or "")
    assert announced == []
    # Still down: the retry fails again and keeps the job pending.
    svc._export_backoff[JOB] = (1, 0.0)
    await svc.retry_exports()
    assert (await svc.store.jobs.get(JOB)).export_pending

    s3.start()  # back, but empty: the bucket is gone and is made again
    svc._export_backoff[JOB] = (2, 0.0)  # its backoff is up
    await svc.retry_exports()
    job = await svc.store.jobs.get(JOB)
    assert not job.export_pending and job.export_error is None
    assert job.export_uri == f"s3://exports/jobs/{JOB}/export/instructions.jsonl"
    data = await svc.objects.get_bytes(f"jobs/{JOB}/export/instructions.jsonl")
    assert [json.loads(line)["instruction"] for line in data.decode().splitlines()] == ["q0", "q1"]
    await svc.bus.drain()  # type: ignore[attr-defined]
    assert [m.rows for m in announced] == [2]
    await svc.store.close()


async def test_post_export_reruns_it(tmp_path: Path, s3: S3) -> None:
    svc, announced = await setup(tmp_path, s3)
    app = create_app(svc.settings, service=svc)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://topics",
        headers={"authorization": f"Bearer {KEY}"},
    ) as c:
        r = await c.post(f"/v1/jobs/{JOB}/export")
        assert r.status_code == 200, r.text
        assert r.json()["export"].startswith("s3://exports/") and not r.json()["export_pending"]
        await svc.store.jobs.set_status(JOB, "running")
        r = await c.post(f"/v1/jobs/{JOB}/export")
        assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    await svc.bus.drain()  # type: ignore[attr-defined]
    assert len(announced) == 1
    await svc.store.close()


async def test_a_bucket_that_went_missing_is_made_again(tmp_path: Path, s3: S3) -> None:
    svc, _ = await setup(tmp_path, s3)
    await svc.export_or_retry_later(JOB)
    assert (await svc.store.jobs.get(JOB)).export_uri is not None
    s3.stop()
    s3.start()  # a restarted S3 without its data: the bucket is gone
    await svc.export_or_retry_later(JOB)
    job = await svc.store.jobs.get(JOB)
    assert not job.export_pending, job.export_error
    assert await svc.objects.exists(f"jobs/{JOB}/export/manifest.json")
    await svc.store.close()
