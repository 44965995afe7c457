"""airoboros.bus.InMemoryBus: at-least-once delivery, dead letters, drain()."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from airoboros.bus import InMemoryBus
from airoboros.contracts import BatchCompleted, JobEvent


@pytest.fixture
async def bus() -> AsyncIterator[InMemoryBus]:
    b = InMemoryBus(max_deliveries=3)
    yield b
    await b.close()


async def test_every_subscriber_gets_each_message(bus: InMemoryBus) -> None:
    first: list[JobEvent] = []
    second: list[JobEvent] = []

    async def one(ev: JobEvent) -> None:
        first.append(ev)

    async def two(ev: JobEvent) -> None:
        ev.detail = "changed by two"  # must not leak into the other subscriber's copy
        second.append(ev)

    bus.subscribe(JobEvent, one)
    bus.subscribe(JobEvent, two)
    await bus.start()
    sent = [JobEvent(job_id=f"j{i}", status="running", detail="d") for i in range(3)]
    for ev in sent:
        await bus.publish(ev)
    await asyncio.wait_for(bus.drain(), 5)

    assert [e.job_id for e in first] == ["j0", "j1", "j2"]
    assert [e.message_id for e in second] == [e.message_id for e in sent]
    assert all(e.detail == "d" for e in first)
    assert all(e.detail == "d" for e in sent)
    assert bus.dead_letters == []


async def test_messages_go_only_to_their_topic(bus: InMemoryBus) -> None:
    events: list[JobEvent] = []
    batches: list[BatchCompleted] = []

    async def on_event(ev: JobEvent) -> None:
        events.append(ev)

    async def on_batch(msg: BatchCompleted) -> None:
        batches.append(msg)

    bus.subscribe(JobEvent, on_event)
    bus.subscribe(BatchCompleted, on_batch)
    await bus.start()
    await bus.publish(BatchCompleted(job_id="j", task_id="t", instructor="general"))
    await asyncio.wait_for(bus.drain(), 5)
    assert events == []
    assert len(batches) == 1


async def test_handler_that_raises_gets_the_message_again(bus: InMemoryBus) -> None:
    attempts: list[str] = []

    async def flaky(ev: JobEvent) -> None:
        attempts.append(ev.message_id)
        if len(attempts) == 1:
            raise RuntimeError("transient")

    bus.subscribe(JobEvent, flaky)
    await bus.start()
    ev = JobEvent(job_id="j", status="running")
    await bus.publish(ev)
    await asyncio.wait_for(bus.drain(), 5)
    assert attempts == [ev.message_id, ev.message_id]
    assert bus.dead_letters == []


async def test_dead_lettered_after_max_deliveries(bus: InMemoryBus) -> None:
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
    assert dead.message.message_id == ev.message_id
    assert "always broken" in dead.error


async def test_failing_message_does_not_block_others(bus: InMemoryBus) -> None:
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
    assert [d.message.job_id for d in bus.dead_letters] == ["bad"]


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


async def test_subscribe_after_start_is_refused(bus: InMemoryBus) -> None:
    await bus.start()

    async def handler(ev: JobEvent) -> None:
        return None

    with pytest.raises(RuntimeError):
        bus.subscribe(JobEvent, handler)


async def test_publish_without_subscriber_is_dropped(bus: InMemoryBus) -> None:
    await bus.start()
    await bus.publish(JobEvent(job_id="j", status="running"))
    await asyncio.wait_for(bus.drain(), 5)
    assert bus.dead_letters == []
