"""airoboros.bus: what InMemoryBus does beyond the port (drain, its dead-letter record),
and the decoding rules both buses share (schema versions, refusals)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from airoboros.bus import InMemoryBus, Refused, body_problem, decode, version_problem
from airoboros.contracts import SCHEMA_VERSION, BatchCompleted, JobEvent, Message
from airoboros.errors import BusError


@pytest.fixture
async def bus() -> AsyncIterator[InMemoryBus]:
    b = InMemoryBus(max_deliveries=3)
    yield b
    await b.close()


# What InMemoryBus shares with AmqpBus (groups, topics, redelivery, dead letters through
# consume_dead_letters, partitions, the JSON wire, schema versions) is held to the port in
# tests/contract/test_bus_contract.py; here is what is its own.


async def test_dead_letters_are_recorded_with_the_error(bus: InMemoryBus) -> None:
    attempts = 0

    async def broken(ev: JobEvent) -> None:
        nonlocal attempts
        attempts += 1
        raise ValueError("always broken")

    bus.subscribe(JobEvent, broken)
    await bus.start()
    ev = JobEvent(job_id="j", status="failed")
    await bus.publish(ev)
    await asyncio.wait_for(bus.drain(), 5)
    assert attempts == 3
    assert len(bus.dead_letters) == 1
    dead = bus.dead_letters[0]
    assert dead.deliveries == 3
    assert dead.message is not None and dead.message.message_id == ev.message_id
    assert "always broken" in dead.error
    [queue] = bus.queue_names(JobEvent)
    assert dead.queue == f"{queue}.dlq"
    assert JobEvent.model_validate_json(dead.body) == ev
    assert dead.headers["x-first-death-reason"] == "delivery_limit"
    assert "always broken" in dead.headers["x-dead-letter-reason"]


async def test_a_failing_message_is_recorded_and_others_go_on(bus: InMemoryBus) -> None:
    ok: list[str] = []

    async def handler(ev: JobEvent) -> None:
        if ev.job_id == "bad":
            raise RuntimeError("bad")
        ok.append(ev.job_id)

    bus.subscribe(JobEvent, handler, concurrency=2)
    await bus.start()
    for job in ("a", "bad", "b"):
        await bus.publish(JobEvent(job_id=job, status="running"))
    await asyncio.wait_for(bus.drain(), 5)
    assert sorted(ok) == ["a", "b"]
    assert [d.message.job_id for d in bus.dead_letters if isinstance(d.message, JobEvent)] == [
        "bad"
    ]


async def test_a_newer_major_is_recorded_with_the_reason_unparsed(bus: InMemoryBus) -> None:
    called: list[JobEvent] = []

    async def handler(ev: JobEvent) -> None:
        called.append(ev)

    bus.subscribe(JobEvent, handler)
    await bus.start()
    await bus.publish(JobEvent(job_id="j", status="running", schema_version="2.0"))
    await asyncio.wait_for(bus.drain(), 5)
    assert called == []
    [dead] = bus.dead_letters
    assert dead.message is None and dead.deliveries == 1
    assert dead.error == "schema_version 2.0: unknown major version 2 (this release reads 1.x)"
    assert dead.headers["x-first-death-reason"] == "rejected"


async def test_partitions_are_queues_of_their_own(bus: InMemoryBus) -> None:
    b = InMemoryBus(partitions={"generation.completed": 3, "jobs.events": 1})
    assert b.partitions == {"generation.completed": 3}
    assert b.routing_key(JobEvent(job_id="j", status="done")) == "jobs.events"
    keyless = BatchCompleted(job_id="j", task_id="t", instructor="general")
    assert b.routing_key(keyless) == "generation.completed.p0"
    assert b.queue_names(BatchCompleted, "topics") == [
        f"airoboros.topics.generation.completed.p{k}" for k in range(3)
    ]
    with pytest.raises(ValueError, match="at least 1"):
        InMemoryBus(partitions={"x": 0})


async def test_a_publish_before_start_waits_for_start(bus: InMemoryBus) -> None:
    got: list[JobEvent] = []

    async def handler(ev: JobEvent) -> None:
        got.append(ev)

    bus.subscribe(JobEvent, handler)
    await bus.publish(JobEvent(job_id="early", status="running"))
    [queue] = bus.queue_names(JobEvent)
    assert await bus.message_count(queue) == 1
    await bus.start()
    await asyncio.wait_for(bus.drain(), 5)
    assert [e.job_id for e in got] == ["early"]


async def test_extras_need_a_started_bus(bus: InMemoryBus) -> None:
    async def on_dead_letter(queue: str, body: bytes, headers: dict[str, Any]) -> None:
        return None

    with pytest.raises(RuntimeError, match="start"):
        await bus.ensure_queue(JobEvent, group="later")
    with pytest.raises(RuntimeError, match="start"):
        await bus.consume_dead_letters(on_dead_letter)
    with pytest.raises(BusError, match="no queue named"):
        await bus.message_count("nothing")


async def test_drain_ignores_queues_nobody_consumes(bus: InMemoryBus) -> None:
    await bus.start()
    await bus.ensure_queue(JobEvent, group="elsewhere")
    await bus.publish(JobEvent(job_id="kept", status="running"))
    await asyncio.wait_for(bus.drain(), 5)
    [queue] = bus.queue_names(JobEvent, "elsewhere")
    assert await bus.message_count(queue) == 1


async def test_drain_waits_for_slow_handlers(bus: InMemoryBus) -> None:
    finished: list[str] = []

    async def slow(ev: JobEvent) -> None:
        await asyncio.sleep(0.05)
        finished.append(ev.job_id)

    bus.subscribe(JobEvent, slow, concurrency=2)
    await bus.start()
    for i in range(4):
        await bus.publish(JobEvent(job_id=str(i), status="running"))
    await asyncio.wait_for(bus.drain(), 5)
    assert sorted(finished) == ["0", "1", "2", "3"]


async def test_drain_follows_messages_published_by_handlers(bus: InMemoryBus) -> None:
    finished: list[str] = []

    async def relay(msg: BatchCompleted) -> None:
        await bus.publish(JobEvent(job_id=msg.job_id, status="done"))

    async def record(ev: JobEvent) -> None:
        finished.append(ev.job_id)

    # The relay's queue is drained first here, so its follow-up is seen on the next pass.
    bus.subscribe(BatchCompleted, relay)
    bus.subscribe(JobEvent, record)
    await bus.start()
    await bus.publish(BatchCompleted(job_id="j", task_id="t", instructor="general"))
    await asyncio.wait_for(bus.drain(), 5)
    assert finished == ["j"]


async def test_drain_waits_for_follow_up_handler_still_running(bus: InMemoryBus) -> None:
    finished: list[str] = []

    async def slow_record(ev: JobEvent) -> None:
        await asyncio.sleep(0.1)
        finished.append(ev.job_id)

    async def relay(msg: BatchCompleted) -> None:
        await asyncio.sleep(0.02)  # drain() is already waiting when the follow-up goes out
        await bus.publish(JobEvent(job_id=msg.job_id, status="done"))

    # JobEvent's queue comes first, so drain() joins it before the relay publishes.
    bus.subscribe(JobEvent, slow_record)
    bus.subscribe(BatchCompleted, relay)
    await bus.start()
    await bus.publish(BatchCompleted(job_id="j", task_id="t", instructor="general"))
    await asyncio.wait_for(bus.drain(), 5)
    assert finished == ["j"]


# --- schema versions and decoding (both buses) ------------------------------------------


def test_schema_version_is_major_minor_and_reads_the_legacy_integer() -> None:
    assert SCHEMA_VERSION == "1.2"
    assert JobEvent(job_id="j", status="done").schema_version == "1.2"
    legacy = '{"schema_version": 1, "job_id": "j", "status": "done"}'
    assert JobEvent.model_validate_json(legacy).schema_version == "1.0"
    assert JobEvent(job_id="j", status="done", schema_version="1.07").schema_version == "1.7"
    assert Message.version_parts("12.3") == (12, 3)
    for bad in ["1", "1.x", "v1.0", "1.0.0", "", "１.0", 1.5, True, None, -1]:
        with pytest.raises(ValueError, match=r"MAJOR\.MINOR"):
            Message.version_parts(bad)
        with pytest.raises(ValueError):
            JobEvent(job_id="j", status="done", schema_version=bad)


def test_unknown_fields_are_ignored_by_every_reader() -> None:
    body = (
        '{"job_id": "j", "task_id": "t", "instructor": "general", "new": 1,'
        ' "items": [{"instruction": "i", "response": "r", "category": "c", "new": 2}],'
        ' "stats": {"asked": 1, "new": 3}}'
    )
    msg = BatchCompleted.model_validate_json(body)
    assert msg.items[0].instruction == "i" and msg.stats.asked == 1
    assert "new" not in msg.model_dump() and "new" not in msg.items[0].model_dump()


def test_version_rules() -> None:
    assert version_problem("1.0") is None
    assert version_problem("1.99") is None
    assert version_problem(1) is None
    assert version_problem("2.0") == (
        "schema_version 2.0: unknown major version 2 (this release reads 1.x)"
    )
    assert version_problem(0) is not None
    assert "MAJOR.MINOR" in (version_problem("one") or "")


def test_body_problem_and_decode() -> None:
    ok = JobEvent(job_id="j", status="done")
    assert body_problem(ok.model_dump_json().encode()) is None
    assert decode(JobEvent, ok.model_dump_json().encode()) == ok
    assert "not JSON" in (body_problem(b"{not json") or "")
    assert "not JSON" in (body_problem(b"\xff\xfe") or "")
    assert "not a JSON object" in (body_problem(b"[1]") or "")

    newer = ok.model_copy(update={"schema_version": "2.0"}).model_dump_json().encode()
    with pytest.raises(Refused, match="unknown major version 2"):
        decode(JobEvent, newer)
    # A newer major that no longer validates still says why: its version.
    gone = b'{"schema_version": "3.0", "job": {"id": "j"}}'
    with pytest.raises(Refused, match="unknown major version 3"):
        decode(JobEvent, gone)
    with pytest.raises(Refused, match="does not parse as JobEvent"):
        decode(JobEvent, b'{"job_id": "j", "status": "exploded"}')
    with pytest.raises(Refused, match="not JSON"):
        decode(JobEvent, b"{not json")
