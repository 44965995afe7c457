"""AmqpBus against the real RabbitMQ on 127.0.0.1:5672 (``AIROBOROS_TEST_AMQP_URL``):
what the contract suite (tests/contract/test_bus_contract.py, on both buses) cannot
show with one bus: replicas in separate processes, durability across buses and broker
restarts, the AMQP properties of a message, raw bodies, the broker's own errors.

Each test works under its own random prefix and deletes its exchanges and queues at
the end. The broker-restart test stops and restarts the RabbitMQ application with
``rabbitmqctl`` (as root); deselect it with ``-m "not broker_restart"``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar, Literal
from urllib.parse import urlparse

import aio_pika
import pytest

from airoboros.bus_amqp import AmqpBus, BusError, BusUnavailable, partition_of
from airoboros.contracts import Message
from airoboros.ports import Bus

AMQP_URL = os.environ.get("AIROBOROS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def _broker_up() -> bool:
    u = urlparse(AMQP_URL)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 5672), timeout=1):
            return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _broker_up(), reason=f"no RabbitMQ at {AMQP_URL}")


class Ping(Message):
    topic: ClassVar[str] = "test.ping"
    kind: Literal["ping"] = "ping"
    n: int
    key: str | None = None

    def partition_key(self) -> str | None:
        return self.key


async def wait_until(predicate: Callable[[], bool], within: float, what: str) -> None:
    """Poll ``predicate`` until true; fail the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


class Buses:
    """Makes AmqpBus instances under one random prefix; ``cleanup`` closes them and
    deletes everything they declared."""

    def __init__(self) -> None:
        self.prefix = f"test-{uuid.uuid4().hex[:12]}"
        self.made: list[AmqpBus] = []
        #: queues a test declared itself, to delete too
        self.extra_queues: set[str] = set()

    def __call__(self, **kw: Any) -> AmqpBus:
        kw.setdefault("reconnect_interval", 0.5)
        kw.setdefault("close_timeout", 5.0)
        bus = AmqpBus(AMQP_URL, prefix=self.prefix, **kw)
        self.made.append(bus)
        return bus

    async def cleanup(self) -> None:
        names = set(self.extra_queues)
        for bus in self.made:
            names |= bus.declared_queues
            await asyncio.wait_for(bus.close(), timeout=30)
        names |= await asyncio.to_thread(self._listed_queues)
        conn = await aio_pika.connect(AMQP_URL, timeout=10)
        try:
            for name in sorted(names):
                # A fresh channel per delete: one failure must not stop the rest.
                async with conn.channel() as ch:
                    await ch.queue_delete(name)
            for exchange in (self.prefix, f"{self.prefix}.dlx"):
                async with conn.channel() as ch:
                    await ch.exchange_delete(exchange)
        finally:
            await conn.close()

    def _listed_queues(self) -> set[str]:
        # A safety net for queues a failed test declared but did not record.
        if not _can_rabbitmqctl():
            return set()
        out = subprocess.run(
            ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
        return {q.strip() for q in out.splitlines() if q.strip().startswith(self.prefix + ".")}


@pytest.fixture
async def buses() -> AsyncIterator[Buses]:
    made = Buses()
    try:
        yield made
    finally:
        await made.cleanup()


def _can_rabbitmqctl() -> bool:
    return shutil.which("rabbitmqctl") is not None and os.geteuid() == 0


# --- round trip ---------------------------------------------------------------------


async def test_round_trip_keeps_fields_id_and_trace_headers(buses: Buses) -> None:
    bus = buses()
    assert isinstance(bus, Bus)
    got: list[Ping] = []

    async def handle(m: Ping) -> None:
        got.append(m)

    bus.subscribe(Ping, handle, group="g")
    await bus.start()
    # A plain queue on the same exchange, to look at the AMQP properties as sent.
    conn = await aio_pika.connect(AMQP_URL, timeout=10)
    try:
        ch = await conn.channel()
        probe = await ch.declare_queue(exclusive=True, auto_delete=True)
        await probe.bind(bus.exchange_name, routing_key=Ping.topic)

        sent = Ping(
            n=7,
            key="k",
            headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        )
        await bus.publish(sent)
        await wait_until(lambda: len(got) == 1, 10, "the message")
        raw = await probe.get(timeout=5, fail=True)
        await raw.ack()
    finally:
        await conn.close()

    assert got[0] == sent  # every field, message_id and headers included
    assert got[0].message_id == sent.message_id
    assert got[0].headers["traceparent"] == sent.headers["traceparent"]
    assert raw.message_id == sent.message_id
    assert raw.type == Ping.topic
    assert raw.content_type == "application/json"
    assert raw.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert raw.headers["traceparent"] == sent.headers["traceparent"]
    assert raw.headers["x-schema-version"] == sent.schema_version
    assert Ping.model_validate_json(raw.body) == sent


# --- groups -------------------------------------------------------------------------


async def test_same_group_shares_and_each_group_gets_every_message(buses: Buses) -> None:
    replica_a, replica_b, auditor = buses(), buses(), buses()
    seen: dict[str, list[int]] = defaultdict(list)

    def recorder(name: str) -> Callable[[Ping], Any]:
        async def handle(m: Ping) -> None:
            await asyncio.sleep(0.002)
            seen[name].append(m.n)

        return handle

    replica_a.subscribe(Ping, recorder("a"), group="workers", concurrency=2)
    replica_b.subscribe(Ping, recorder("b"), group="workers", concurrency=2)
    auditor.subscribe(Ping, recorder("audit"), group="audit")
    for bus in (replica_a, replica_b, auditor):
        await bus.start()

    n = 60
    for i in range(n):
        await replica_a.publish(Ping(n=i))
    workers = lambda: seen["a"] + seen["b"]  # noqa: E731
    await wait_until(lambda: len(workers()) >= n and len(seen["audit"]) >= n, 20, "delivery")
    await asyncio.sleep(0.3)  # anything extra would show up now

    assert sorted(workers()) == list(range(n)), "each message handled once within a group"
    assert seen["a"] and seen["b"], "both replicas of the group got a share"
    assert sorted(seen["audit"]) == list(range(n)), "the other group got its own copy"


# --- failure and dead letters -------------------------------------------------------


async def test_a_body_that_is_not_json_is_dead_lettered_at_once(buses: Buses) -> None:
    # The contract suite (tests/contract) covers redelivery and dead letters on both
    # buses; only raw AMQP can put bytes on the queue that no bus would publish.
    bus = buses(max_deliveries=3)
    calls: Counter[str] = Counter()

    async def handle(m: Ping) -> None:
        calls[m.message_id] += 1

    bus.subscribe(Ping, handle, group="g")
    await bus.start()
    (queue,) = bus.queue_names(Ping, "g")
    dlq = f"{queue}.dlq"

    # A body that does not decode: dead-lettered at once, never given to the handler.
    conn = await aio_pika.connect(AMQP_URL, timeout=10)
    try:
        ch = await conn.channel()
        exchange = await ch.get_exchange(bus.exchange_name)
        await exchange.publish(
            aio_pika.Message(b"{not json", message_id="garbage"), routing_key=Ping.topic
        )
    finally:
        await conn.close()

    deadline = time.monotonic() + 20
    while await bus.message_count(dlq) < 1:
        assert time.monotonic() < deadline, "the garbage was not dead-lettered"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    assert calls == {}
    assert await bus.message_count(queue) == 0

    letters: list[tuple[str, bytes, dict[str, Any]]] = []

    async def on_dead_letter(q: str, body: bytes, headers: dict[str, Any]) -> None:
        letters.append((q, body, headers))

    assert await bus.consume_dead_letters(on_dead_letter) == [dlq]
    await wait_until(lambda: len(letters) == 1, 10, "the dead letter")
    [(name, body, headers)] = letters
    assert name == dlq
    assert headers["x-first-death-reason"] == "rejected"
    assert body == b"{not json"
    assert "not JSON" in headers["x-dead-letter-reason"]
    deadline = time.monotonic() + 5
    while await bus.message_count(dlq) != 0:  # acked: the queue is drained
        assert time.monotonic() < deadline, "dead letters were not acknowledged"
        await asyncio.sleep(0.05)


# --- durability ---------------------------------------------------------------------


async def test_messages_wait_durably_for_a_consumer_that_starts_later(buses: Buses) -> None:
    publisher = buses()
    await publisher.start()
    await publisher.ensure_queue(Ping, group="late")  # no consumer yet
    sent = [Ping(n=i) for i in range(20)]
    for m in sent:
        await publisher.publish(m)
    await publisher.close()

    consumer = buses()
    got: list[Ping] = []

    async def handle(m: Ping) -> None:
        got.append(m)

    consumer.subscribe(Ping, handle, group="late")
    await consumer.start()
    await wait_until(lambda: len(got) >= len(sent), 10, "the stored messages")
    assert sorted(got, key=lambda m: m.n) == sent


async def test_start_fails_clearly_without_broker() -> None:
    bus = AmqpBus("amqp://guest:secret@127.0.0.1:1/", prefix="unused")
    with pytest.raises(BusUnavailable, match=r"cannot reach RabbitMQ at amqp://guest:\*\*\*@"):
        await bus.start()
    await bus.close()


# --- partitions ---------------------------------------------------------------------


async def test_partitioned_topic_handles_one_key_at_a_time_across_replicas(
    buses: Buses,
) -> None:
    parts = {Ping.topic: 2}
    replica_a, replica_b = buses(partitions=parts), buses(partitions=parts)
    assert replica_a.routing_key(Ping(n=0)) == f"{Ping.topic}.p0", "keyless -> partition 0"

    # Keys covering both partitions.
    keys = [f"job-{i}" for i in range(8)]
    assert {partition_of(k, 2) for k in keys} == {0, 1}

    active: Counter[str] = Counter()
    overlaps: list[str] = []
    handled: dict[str, list[int]] = defaultdict(list)
    owners: dict[str, set[str]] = defaultdict(set)

    def replica(name: str, bus: AmqpBus) -> Callable[[Ping], Any]:
        async def handle(m: Ping) -> None:
            assert m.key is not None
            active[m.key] += 1
            if active[m.key] > 1:
                overlaps.append(m.key)
            owners[bus.routing_key(m)].add(name)
            await asyncio.sleep(0.01)
            handled[m.key].append(m.n)
            active[m.key] -= 1

        return handle

    replica_a.subscribe(Ping, replica("a", replica_a), group="dedupe", concurrency=4)
    replica_b.subscribe(Ping, replica("b", replica_b), group="dedupe", concurrency=4)
    await replica_a.start()
    await replica_b.start()

    per_key = 8
    for i in range(per_key):
        for k in keys:
            await replica_b.publish(Ping(n=i, key=k))
    total = per_key * len(keys)
    await wait_until(lambda: sum(map(len, handled.values())) >= total, 30, "every message")
    await asyncio.sleep(0.2)

    assert not overlaps, f"keys handled concurrently: {overlaps}"
    assert {k: sorted(v) for k, v in handled.items()} == {k: list(range(per_key)) for k in keys}
    # In order per key, and each partition fed to one replica only (single active consumer).
    assert all(v == sorted(v) for v in handled.values())
    assert all(len(o) == 1 for o in owners.values()), owners


# --- broker restart -----------------------------------------------------------------


def _rabbitmqctl(*args: str, timeout: float = 60) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=timeout)


async def _wait_for_broker(within: float) -> None:
    deadline = time.monotonic() + within
    while not _broker_up():
        if time.monotonic() > deadline:
            raise AssertionError(f"RabbitMQ did not come back within {within}s")
        await asyncio.sleep(0.2)


@pytest.mark.broker_restart
@pytest.mark.skipif(not _can_rabbitmqctl(), reason="needs rabbitmqctl, as root")
async def test_survives_a_broker_restart_mid_stream(buses: Buses) -> None:
    publisher = buses(publish_timeout=60)
    consumer = buses()
    received: Counter[int] = Counter()

    async def handle(m: Ping) -> None:
        received[m.n] += 1

    consumer.subscribe(Ping, handle, group="g", concurrency=4)
    await consumer.start()
    await publisher.start()
    # A second group with no consumer until after the restart: what it holds must
    # survive the broker going down.
    await publisher.ensure_queue(Ping, group="after")
    impatient = buses(publish_timeout=0.5)
    await impatient.start()

    n = 80
    errors: list[BaseException] = []
    slowest = 0.0

    async def produce() -> None:
        nonlocal slowest
        for i in range(n):
            t0 = time.monotonic()
            try:
                await publisher.publish(Ping(n=i))
            except Exception as exc:
                errors.append(exc)
            slowest = max(slowest, time.monotonic() - t0)
            await asyncio.sleep(0.05)

    producer = asyncio.create_task(produce())
    try:
        await wait_until(lambda: len(received) >= 15, 20, "the first messages")
        before_stop = len(received)
        try:
            await asyncio.to_thread(_rabbitmqctl, "stop_app")
            # Publishes meanwhile wait for the broker; past publish_timeout they fail clearly.
            with pytest.raises(BusUnavailable, match=r"could not publish .* within 0\.5s"):
                await impatient.publish(Ping(n=-1))
            await asyncio.sleep(0.5)
        finally:
            # Always bring the broker back, whatever happened above.
            await asyncio.to_thread(_rabbitmqctl, "start_app", timeout=120)
            await asyncio.to_thread(_rabbitmqctl, "await_startup", timeout=120)
            await _wait_for_broker(60)
        await asyncio.wait_for(asyncio.shield(producer), timeout=90)
    finally:
        if not producer.done():
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)

    assert not errors, errors
    assert slowest > 0.5, "no publish had to wait: the outage was not exercised"
    assert before_stop < n, "the whole stream went through before the restart"
    await wait_until(lambda: set(received) >= set(range(n)), 60, "every message after restart")
    assert set(received) == set(range(n))

    late = buses()
    kept: set[int] = set()

    async def handle_late(m: Ping) -> None:
        kept.add(m.n)

    late.subscribe(Ping, handle_late, group="after")
    await late.start()
    await wait_until(lambda: kept >= set(range(n)), 30, "the messages kept across the restart")


async def test_queue_with_other_arguments_is_a_clear_error(buses: Buses) -> None:
    bus = buses(max_deliveries=3)
    bus.subscribe(Ping, lambda m: asyncio.sleep(0), group="g")
    (queue,) = bus.queue_names(Ping, "g")
    buses.extra_queues.add(queue)
    conn = await aio_pika.connect(AMQP_URL, timeout=10)
    try:
        ch = await conn.channel()
        await ch.declare_queue(queue, durable=True)  # classic: not what the bus declares
    finally:
        await conn.close()
    with pytest.raises(BusError, match="exists with other arguments"):
        await bus.start()
