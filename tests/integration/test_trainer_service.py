"""The trainer as a real process: dataset.exported in (RabbitMQ), adapters out (S3 via
moto), the registry in PostgreSQL, adapter.published announced; a training that fails
is recorded and its message dead-lettered, not lost."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from airoboros.contracts import AdapterPublished, DatasetExported
from tests.fakes.tiny_llama import build_tiny_llama
from tests.integration.services_harness import (
    REPO,
    Stack,
    base_env,
    create_database,
    delete_amqp,
    drop_database,
    free_port,
)

pytestmark = pytest.mark.services


def rows() -> list[dict[str, Any]]:
    out = []
    for i in range(12):
        out.append(
            {
                "instruction": f"Write a function that adds {i} to a number.",
                "response": f"def add(x):\n    return x + {i}",
                "category": "coding",
            }
        )
        out.append(
            {"instruction": f"Name colour number {i}.", "response": "Blue.", "category": "general"}
        )
    return out


@pytest.fixture
def stack(tmp_path: Path, llm_server: Any) -> Iterator[Stack]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    s3.start()
    name, url = create_database()
    env = base_env(url, f"127.0.0.1:{port}", llm_server().base_url)
    subprocess.run(
        [sys.executable, "-c", "from airoboros.cli import entry; entry()", "migrate"],
        env=env,
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    st = Stack(tmp_path, env)
    try:
        yield st
    finally:
        st.stop_all()
        drop_database(name)
        delete_amqp(env["AIROBOROS_AMQP_PREFIX"])
        s3.stop()


async def put_export(stack: Stack, job_id: str, data: list[dict[str, Any]]) -> str:
    from airoboros.objects_s3 import S3ObjectStore

    env = stack.env
    objects = S3ObjectStore(
        env["AIROBOROS_S3_ENDPOINT"], "testing", "testing", env["AIROBOROS_S3_BUCKET"]
    )
    body = "".join(json.dumps(r) + "\n" for r in data).encode()
    return await objects.put_bytes(f"jobs/{job_id}/export/instructions.jsonl", body)


async def registry(stack: Stack) -> list[Any]:
    from airoboros.store import SqlStore

    store = SqlStore(stack.env["AIROBOROS_DATABASE_URL"])
    await store.connect(migrate=False)
    try:
        return await store.registry.adapters()
    finally:
        await store.close()


def test_trainer_publishes_experts_and_keeps_failures(stack: Stack, tmp_path: Path) -> None:
    from airoboros.bus_amqp import AmqpBus

    base = build_tiny_llama(tmp_path / "base")
    train_cfg = tmp_path / "train.yaml"
    train_cfg.write_text(
        yaml.safe_dump(
            {
                "max_steps": 3,
                "lora_r": 4,
                "lora_alpha": 8,
                "max_length": 128,
                "batch_size": 2,
                "save_steps": 2,
                "eval_fraction": 0.0,
                "gradient_checkpointing": False,
            }
        )
    )
    stack.start("topics", "airoboros.topics")  # declares the queues, records dead letters
    stack.start(
        "trainer",
        "airoboros.trainer",
        AIROBOROS_BASE_MODEL=str(base),
        AIROBOROS_EXPERTS="code,general",
        AIROBOROS_TRAIN_CONFIG=str(train_cfg),
        AIROBOROS_WORK_DIR=str(tmp_path / "work"),
    )
    env = stack.env
    published: list[AdapterPublished] = []

    async def scenario() -> None:
        bus = AmqpBus(
            env["AIROBOROS_AMQP_URL"],
            prefix=env["AIROBOROS_AMQP_PREFIX"],
            max_deliveries=int(env["AIROBOROS_MAX_DELIVERIES"]),
        )

        async def seen(msg: AdapterPublished) -> None:
            published.append(msg)

        bus.subscribe(AdapterPublished, seen, group="router")
        await bus.start()
        try:
            good = await put_export(stack, "job-good", rows())
            await bus.publish(DatasetExported(job_id="job-good", uri=good, rows=24))
            # No coding rows at all: the code expert cannot be trained.
            general_only = [r for r in rows() if r["category"] == "general"]
            bad = await put_export(stack, "job-bad", general_only)
            await bus.publish(DatasetExported(job_id="job-bad", uri=bad, rows=12))
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                recs = await registry(stack)
                bad_done = [r for r in recs if r.job_id == "job-bad" and r.status != "training"]
                if len(published) >= 3 and len(bad_done) == 2:
                    break
                await asyncio.sleep(1)
        finally:
            await bus.close()

    asyncio.run(scenario())
    recs = asyncio.run(registry(stack))
    good = {r.expert: r for r in recs if r.job_id == "job-good"}
    assert {e: r.status for e, r in good.items()} == {
        "code": "published",
        "general": "published",
    }, stack.logs()
    assert good["code"].uri.startswith("s3://") and good["code"].metrics["steps"] == 3
    assert {m.expert for m in published if m.job_id == "job-good"} == {"code", "general"}

    bad = {r.expert: r for r in recs if r.job_id == "job-bad"}
    assert bad["code"].status == "failed" and "no training rows" in (bad["code"].detail or "")
    assert bad["general"].status == "published"

    from minio import Minio

    client = Minio(env["AIROBOROS_S3_ENDPOINT"], "testing", "testing", secure=False)
    keys = {
        o.object_name
        for o in client.list_objects(
            env["AIROBOROS_S3_BUCKET"], "jobs/job-good/experts/", recursive=True
        )
    }
    for expert in ("code", "general"):
        for f in ("adapter_config.json", "adapter_model.safetensors", "description.txt"):
            assert f"jobs/job-good/experts/adapters/{expert}/{f}" in keys
        assert f"jobs/job-good/experts/routing_data/expert_{expert}.jsonl" in keys

    # The failed message is retried, then dead-lettered (kept where a job's status shows
    # it, GET /v1/jobs/{id} "dead_letters"; the registry rows say what failed).
    deadline = time.monotonic() + 120
    dead: list[Any] = []
    while time.monotonic() < deadline and not dead:
        dead = asyncio.run(dead_letters(stack, "job-bad"))
        time.sleep(1)
    assert dead and dead[0]["kind"] == "dataset_exported", stack.logs()


async def dead_letters(stack: Stack, job_id: str) -> list[Any]:
    from airoboros.store import SqlStore

    store = SqlStore(stack.env["AIROBOROS_DATABASE_URL"])
    await store.connect(migrate=False)
    try:
        return await store.dead_letters.for_job(job_id)
    finally:
        await store.close()
