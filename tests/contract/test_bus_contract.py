"""The Bus contract (airoboros.ports.Bus), held against InMemoryBus (always) and AmqpBus
(on the RabbitMQ at ``AIROBOROS_TEST_AMQP_URL``, 127.0.0.1:5672 by default; skipped when
none answers). Code written and unit-tested against the in-process bus must behave the
same on the broker, so each test here runs on both.

Every AmqpBus works under a random prefix of its own test (exchanges and queues are
deleted at the end), so parallel runs do not collide. What only one adapter does lives
beside it: tests/unit/test_bus.py (drain, the dead-letter record) and
tests/integration/test_bus_amqp.py (replicas in separate processes, durability, broker
restarts, AMQP properties); outages that need the broker's delivery counts are in
tests/integration/test_outages.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import types
import typing
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import pytest
from pydantic import BaseModel, SerializerFunctionWrapHandler, create_model, model_serializer

from airoboros import contracts
from airoboros.bus import InMemoryBus, partition_of
from airoboros.contracts import (
    SCHEMA_VERSION,
    BatchStats,
    Candidate,
    CandidatesProposed,
    CandidatesScreened,
    Message,
)
from airoboros.errors import StoreUnavailable
from airoboros.ports import Bus
from tests.integration.test_bus_amqp import Buses, _broker_up, wait_until

FAST = (0.01, 0.05)  # in-place backoff for the tests: quick, still doubling
#: seconds to wait for something that should happen; messages that should not arrive
#: are given SETTLE seconds to show up
WITHIN, SETTLE = 20.0, 0.3
needs_broker = pytest.mark.skipif(not _broker_up(), reason="no RabbitMQ on 127.0.0.1:5672")


class Ping(Message):
    topic: ClassVar[str] = "contract.ping"
    kind: Literal["contract_ping"] = "contract_ping"
    n: int
    key: str | None = None

    def partition_key(self) -> str | None:
        return self.key


class Other(Message):
    topic: ClassVar[str] = "contract.other"
    kind: Literal["contract_other"] = "contract_other"
    n: int


# --- the backends ---------------------------------------------------------------------------


@dataclass
class Backend:
    """Makes buses of one adapter for one test, and closes (and cleans up) after it.
    ``make`` takes the keyword arguments both adapters share: ``max_deliveries``,
    ``partitions``, ``dead_letter_retry_delay``, ``outage_patience``, ``outage_backoff``."""

    name: str
    make: Callable[..., Bus]
    made: list[Bus] = field(default_factory=list)


@pytest.fixture(params=[pytest.param("memory"), pytest.param("amqp", marks=needs_broker)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        made: list[Bus] = []

        def make_memory(**kw: Any) -> Bus:
            bus = InMemoryBus(**kw)
            made.append(bus)
            return bus

        b = Backend("memory", make_memory, made)
        try:
            yield b
        finally:
            for bus in made:
                await bus.close()
        return
    buses = Buses()
    try:
        yield Backend("amqp", buses, buses.made)  # type: ignore[arg-type]
    finally:
        await buses.cleanup()


def recorder(into: list[Any]) -> Callable[[Any], Any]:
    async def handle(m: Any) -> None:
        into.append(m)

    return handle


def dead_letter_recorder(
    into: list[tuple[str, bytes, dict[str, Any]]],
) -> Callable[[str, bytes, dict[str, Any]], Any]:
    async def handle(queue: str, body: bytes, headers: dict[str, Any]) -> None:
        into.append((queue, body, headers))

    return handle


# --- the port ---------------------------------------------------------------------------------


async def test_both_adapters_are_the_port(backend: Backend) -> None:
    bus = backend.make()
    assert isinstance(bus, Bus)
    assert bus.connected is False
    await bus.start()
    assert bus.connected is True
    await bus.close()
    assert bus.connected is False


async def test_subscribe_after_start_is_refused(backend: Backend) -> None:
    bus = backend.make()
    await bus.start()
    with pytest.raises(RuntimeError):
        bus.subscribe(Ping, recorder([]))


async def test_queue_names_and_dead_letter_queues(backend: Backend) -> None:
    bus = backend.make(partitions={Ping.topic: 3})
    [one] = bus.queue_names(Other, "g")
    assert one.endswith(".g.contract.other")
    parts = bus.queue_names(Ping, "g")
    assert [q.rsplit(".", 1)[1] for q in parts] == ["p0", "p1", "p2"]
    assert len({*parts, one}) == 4
    bus.subscribe(Other, recorder([]), group="g")
    await bus.start()
    # The dead-letter queues of the subscriptions, consumed by default.
    assert await bus.consume_dead_letters(dead_letter_recorder([])) == [f"{one}.dlq"]


# --- groups -----------------------------------------------------------------------------------


async def test_same_group_competes_and_each_group_gets_a_copy(backend: Backend) -> None:
    bus = backend.make()
    seen: dict[str, list[Ping]] = defaultdict(list)

    def handler(name: str) -> Callable[[Ping], Any]:
        async def handle(m: Ping) -> None:
            await asyncio.sleep(0.002)
            seen[name].append(m)

        return handle

    async def meddler(m: Ping) -> None:
        m.key = "changed by the auditor"  # must not leak into any other group's copy
        seen["audit"].append(m)

    bus.subscribe(Ping, handler("a"), group="workers", concurrency=2)
    bus.subscribe(Ping, handler("b"), group="workers", concurrency=2)
    bus.subscribe(Ping, meddler, group="audit")
    bus.subscribe(Ping, handler("metrics"), group="metrics")
    await bus.start()

    n = 40
    sent = [Ping(n=i, key="k") for i in range(n)]
    for m in sent:
        await bus.publish(m)
    workers = lambda: seen["a"] + seen["b"]  # noqa: E731
    await wait_until(
        lambda: len(workers()) >= n and len(seen["audit"]) >= n and len(seen["metrics"]) >= n,
        WITHIN,
        "every group's copy",
    )
    await asyncio.sleep(SETTLE)  # anything extra would show up now

    assert sorted(m.n for m in workers()) == list(range(n)), "once within a group"
    assert seen["a"] and seen["b"], "both consumers of the group got a share"
    assert sorted(m.n for m in seen["audit"]) == list(range(n)), "a copy for each group"
    assert sorted(m.n for m in seen["metrics"]) == list(range(n))
    assert {m.message_id for m in seen["metrics"]} == {m.message_id for m in sent}
    assert all(m.key == "k" for m in workers() + seen["metrics"])
    assert all(m.key == "k" for m in sent)


async def test_messages_go_only_to_their_topic(backend: Backend) -> None:
    bus = backend.make()
    pings: list[Ping] = []
    others: list[Other] = []
    bus.subscribe(Ping, recorder(pings), group="g")
    bus.subscribe(Other, recorder(others), group="g")
    await bus.start()
    await bus.publish(Other(n=1))
    await wait_until(lambda: len(others) == 1, WITHIN, "the message")
    await asyncio.sleep(SETTLE)
    assert pings == []
    assert [m.n for m in others] == [1]


async def test_publish_without_a_queue_is_dropped_with_a_warning(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    bus = backend.make()
    await bus.start()
    with caplog.at_level(logging.WARNING):
        await bus.publish(Ping(n=1))  # a warning, not an error
    assert f"no queue bound for {Ping.topic}" in caplog.text


async def test_ensure_queue_keeps_messages_for_a_group_without_consumers(
    backend: Backend,
) -> None:
    bus = backend.make()
    await bus.start()
    await bus.ensure_queue(Ping, group="late")  # no consumer yet
    [queue] = bus.queue_names(Ping, "late")
    for i in range(3):
        await bus.publish(Ping(n=i))
    await wait_until_async(lambda: message_count(bus, queue), 3, "the messages kept")
    assert await message_count(bus, f"{queue}.dlq") == 0


async def test_concurrency_bounds_parallel_handlers(backend: Backend) -> None:
    bus = backend.make()
    active = 0
    peak = 0
    done: list[int] = []

    async def handle(m: Ping) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.05)
        active -= 1
        done.append(m.n)

    bus.subscribe(Ping, handle, group="g", concurrency=4)
    await bus.start()
    await asyncio.gather(*(bus.publish(Ping(n=i)) for i in range(20)))
    await wait_until(lambda: len(done) == 20, WITHIN, "20 messages")
    assert 1 < peak <= 4
    assert sorted(done) == list(range(20))


# --- partitions -------------------------------------------------------------------------------


async def test_partitioned_topic_handles_one_key_at_a_time(backend: Backend) -> None:
    parts = {Ping.topic: 2}
    bus = backend.make(partitions=parts)
    assert bus.queue_names(Ping, "dedupe")[0].endswith(".p0")
    keys = [f"job-{i}" for i in range(8)]
    assert {partition_of(k, 2) for k in keys} == {0, 1}, "keys covering both partitions"

    active: Counter[str] = Counter()
    partition_active: Counter[int] = Counter()
    overlaps: list[str] = []
    handled: dict[str, list[int]] = defaultdict(list)
    owners: dict[int, set[str]] = defaultdict(set)

    def consumer(name: str) -> Callable[[Ping], Any]:
        async def handle(m: Ping) -> None:
            assert m.key is not None
            p = partition_of(m.key, 2)
            active[m.key] += 1
            partition_active[p] += 1
            if active[m.key] > 1 or partition_active[p] > 1:
                overlaps.append(m.key)
            owners[p].add(name)
            await asyncio.sleep(0.005)
            handled[m.key].append(m.n)
            active[m.key] -= 1
            partition_active[p] -= 1

        return handle

    # Two consumers of the group, each allowed 4 at a time: still one per partition.
    bus.subscribe(Ping, consumer("a"), group="dedupe", concurrency=4)
    bus.subscribe(Ping, consumer("b"), group="dedupe", concurrency=4)
    await bus.start()
    per_key = 6
    for i in range(per_key):
        for k in keys:
            await bus.publish(Ping(n=i, key=k))
    total = per_key * len(keys)
    await wait_until(lambda: sum(map(len, handled.values())) >= total, WITHIN, "every message")
    await asyncio.sleep(SETTLE)

    assert not overlaps, f"one partition handled concurrently: {overlaps}"
    assert {k: sorted(v) for k, v in handled.items()} == {k: list(range(per_key)) for k in keys}
    assert all(v == sorted(v) for v in handled.values()), "in order per key"
    assert all(len(o) == 1 for o in owners.values()), f"single active consumer: {owners}"


async def test_an_unpartitioned_topic_spreads_one_key(backend: Backend) -> None:
    # The other side of the contract: only partitioned topics are serialised.
    bus = backend.make(partitions={Ping.topic: 1})
    active = peak = 0
    done: list[int] = []

    async def handle(m: Ping) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.03)
        active -= 1
        done.append(m.n)

    bus.subscribe(Ping, handle, group="g", concurrency=3)
    await bus.start()
    for i in range(9):
        await bus.publish(Ping(n=i, key="same"))
    await wait_until(lambda: len(done) == 9, WITHIN, "9 messages")
    assert peak > 1


# --- failure and dead letters -----------------------------------------------------------------


async def test_a_handler_that_raises_gets_the_message_again(backend: Backend) -> None:
    bus = backend.make(max_deliveries=3)
    attempts: list[str] = []
    done: list[str] = []

    async def flaky(m: Ping) -> None:
        attempts.append(m.message_id)
        if len(attempts) == 1:
            raise RuntimeError("transient")
        done.append(m.message_id)

    bus.subscribe(Ping, flaky, group="g")
    await bus.start()
    [queue] = bus.queue_names(Ping, "g")
    sent = Ping(n=1)
    await bus.publish(sent)
    await wait_until(lambda: bool(done), WITHIN, "the second delivery")
    await asyncio.sleep(SETTLE)
    assert attempts == [sent.message_id, sent.message_id]
    assert await message_count(bus, f"{queue}.dlq") == 0


async def test_retried_then_dead_lettered_after_max_deliveries(backend: Backend) -> None:
    bus = backend.make(max_deliveries=3)
    calls: Counter[str] = Counter()

    async def broken(m: Ping) -> None:
        calls[m.message_id] += 1
        raise ValueError("always broken")

    bus.subscribe(Ping, broken, group="g")
    await bus.start()
    [queue] = bus.queue_names(Ping, "g")
    dlq = f"{queue}.dlq"
    bad = Ping(n=1, headers={"traceparent": TRACEPARENT})
    await bus.publish(bad)
    await wait_until_async(lambda: message_count(bus, dlq), 1, "the dead letter")
    await asyncio.sleep(SETTLE)
    assert calls == {bad.message_id: 3}, "handled exactly max_deliveries times"
    assert await message_count(bus, queue) == 0

    letters: list[tuple[str, bytes, dict[str, Any]]] = []
    assert await bus.consume_dead_letters(dead_letter_recorder(letters)) == [dlq]
    await wait_until(lambda: len(letters) == 1, WITHIN, "the dead letter handled")
    [(name, body, headers)] = letters
    assert name == dlq
    assert Ping.model_validate_json(body) == bad, "the body as it was published"
    assert headers["x-first-death-reason"] == "delivery_limit"
    assert headers["x-schema-version"] == SCHEMA_VERSION
    assert headers["x-dead-letter-reason"]
    await wait_until_async(lambda: message_count(bus, dlq), 0, "the dead letter acknowledged")


async def test_a_failing_message_does_not_block_others(backend: Backend) -> None:
    bus = backend.make(max_deliveries=2)
    ok: list[int] = []

    async def handler(m: Ping) -> None:
        if m.n == 13:
            raise RuntimeError("bad")
        ok.append(m.n)

    bus.subscribe(Ping, handler, group="g", concurrency=2)
    await bus.start()
    letters: list[tuple[str, bytes, dict[str, Any]]] = []
    await bus.consume_dead_letters(dead_letter_recorder(letters))
    for n in (1, 13, 2):
        await bus.publish(Ping(n=n))
    await wait_until(lambda: len(ok) == 2 and len(letters) == 1, WITHIN, "all three settled")
    assert sorted(ok) == [1, 2]
    assert [json.loads(body)["n"] for _, body, _ in letters] == [13]


async def test_a_dead_letter_handler_that_fails_gets_the_message_again(
    backend: Backend,
) -> None:
    bus = backend.make(max_deliveries=1, dead_letter_retry_delay=0.05)

    async def poison(m: Ping) -> None:
        raise RuntimeError("poison")

    bus.subscribe(Ping, poison, group="g")
    await bus.start()
    calls = 0
    recorded: list[str] = []

    async def record(name: str, body: bytes, headers: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the recorder has a bad moment")
        recorded.append(json.loads(body)["message_id"])

    await bus.consume_dead_letters(record)
    sent = Ping(n=1)
    await bus.publish(sent)
    await wait_until(lambda: bool(recorded), WITHIN, "the dead letter recorded")
    await asyncio.sleep(SETTLE)
    assert recorded == [sent.message_id] and calls == 2


# --- outages: waited out in place -------------------------------------------------------------


def flaky(failures: int, effects: list[str], attempts: list[str]) -> Callable[[Ping], Any]:
    """A handler whose database is down for its first ``failures`` attempts."""

    async def handle(m: Ping) -> None:
        attempts.append(m.message_id)
        if len(attempts) <= failures:
            raise StoreUnavailable("database is down") from ConnectionRefusedError(111, "refused")
        effects.append(m.message_id)

    return handle


async def test_an_outage_is_retried_in_place(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    # Two deliveries only: were each outage a redelivery, the second would dead-letter it.
    bus = backend.make(max_deliveries=2, outage_backoff=FAST)
    effects: list[str] = []
    attempts: list[str] = []
    bus.subscribe(Ping, flaky(2, effects, attempts), group="g")
    await bus.start()
    [queue] = bus.queue_names(Ping, "g")
    sent = Ping(n=1)
    with caplog.at_level(logging.WARNING, logger="airoboros.bus"):
        await bus.publish(sent)
        await wait_until(lambda: bool(effects), WITHIN, "the handler's effect")
        await asyncio.sleep(SETTLE)
    assert effects == [sent.message_id], "the handler's effect happened once"
    assert attempts == [sent.message_id] * 3
    assert await message_count(bus, queue) == 0
    assert await message_count(bus, f"{queue}.dlq") == 0
    waits = [r for r in caplog.records if "dependency is unavailable" in r.getMessage()]
    assert len(waits) == 2 and all(r.levelno == logging.WARNING for r in waits)
    assert all(Ping.topic in r.getMessage() and "database is down" in r.getMessage() for r in waits)


async def test_an_outage_past_patience_takes_the_failure_path(backend: Backend) -> None:
    bus = backend.make(max_deliveries=2, outage_patience=0.1, outage_backoff=FAST)
    effects: list[str] = []
    attempts: list[str] = []
    bus.subscribe(Ping, flaky(10_000, effects, attempts), group="g")
    await bus.start()
    letters: list[tuple[str, bytes, dict[str, Any]]] = []
    await bus.consume_dead_letters(dead_letter_recorder(letters))
    sent = Ping(n=1)
    await bus.publish(sent)
    await wait_until(lambda: bool(letters), WITHIN, "the dead letter")
    assert effects == []
    # Waited in place on each delivery, then redelivered, then dead-lettered: never lost.
    assert len(attempts) > 2 * 2
    [(_, body, headers)] = letters
    assert json.loads(body)["message_id"] == sent.message_id
    assert headers["x-first-death-reason"] == "delivery_limit"


async def test_the_dead_letter_consumer_waits_out_an_outage_in_place(backend: Backend) -> None:
    bus = backend.make(max_deliveries=1, dead_letter_retry_delay=0.05, outage_backoff=FAST)

    async def poison(m: Ping) -> None:
        raise RuntimeError("not an outage: dead-lettered at once")

    bus.subscribe(Ping, poison, group="g")
    await bus.start()
    [queue] = bus.queue_names(Ping, "g")
    recorded: list[str] = []
    calls = 0

    async def record(name: str, body: bytes, headers: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        if calls <= 2:  # the store that records dead letters is down for a moment
            raise StoreUnavailable("database is down")
        recorded.append(name)

    await bus.consume_dead_letters(record)
    await bus.publish(Ping(n=1))
    await wait_until(lambda: bool(recorded), WITHIN, "the dead letter recorded")
    await asyncio.sleep(SETTLE)
    assert recorded == [f"{queue}.dlq"] and calls == 3
    assert await message_count(bus, f"{queue}.dlq") == 0


# --- the wire: JSON -------------------------------------------------------------------------

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_json_round_trip_keeps_every_field(backend: Backend) -> None:
    bus = backend.make()
    got: list[CandidatesScreened] = []
    bus.subscribe(CandidatesScreened, recorder(got), group="g")
    await bus.start()
    ist = timezone(timedelta(hours=5, minutes=30))
    sent = CandidatesScreened(
        job_id="ジョブ-1",
        task_id="t\u20281",
        instructor="trivia",
        created_at=datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=ist),
        headers={"traceparent": TRACEPARENT},
        accepted=[
            Candidate(
                instruction="Qu'est-ce que «l'été» ? 🌞 \"quoted\" \\ back\nslash\x00",
                response="Ответ: ∑ x² — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
                system="A chat.",
                meta={"plain": True, "nested": {"list": [1, 2.5, None, "三"]}},
                counts=2,
                cost_tokens=12.75,
            ),
            Candidate(instruction="second", skip_prompt_formatting=True),
        ],
        stats=BatchStats(asked=5, proposed=2, duplicates=3, cost=0.000123, excerpt="…"),
    )
    await bus.publish(sent)
    await wait_until(lambda: len(got) == 1, WITHIN, "the message")
    [m] = got
    assert m == sent, "every field, message_id and nested models included"
    assert m is not sent and m.accepted[0] is not sent.accepted[0]
    assert (
        m.created_at == sent.created_at and m.created_at.utcoffset() == sent.created_at.utcoffset()
    )
    assert m.headers["traceparent"] == TRACEPARENT
    assert m.accepted[0].meta == sent.accepted[0].meta
    assert type(m) is CandidatesScreened and type(m.accepted[0]) is Candidate


async def test_a_handler_gets_a_pristine_message_on_redelivery(backend: Backend) -> None:
    bus = backend.make(max_deliveries=2)
    seen: list[str | None] = []

    async def mutating(m: Ping) -> None:
        seen.append(m.key)
        m.key = "changed"
        if len(seen) == 1:
            raise RuntimeError("once")

    bus.subscribe(Ping, mutating, group="g")
    await bus.start()
    await bus.publish(Ping(n=1, key="original"))
    await wait_until(lambda: len(seen) == 2, WITHIN, "the redelivery")
    assert seen == ["original", "original"]


# --- the wire: schema versions ----------------------------------------------------------------

MESSAGE_TYPES = sorted(
    (
        obj
        for obj in vars(contracts).values()
        if isinstance(obj, type) and issubclass(obj, Message) and obj is not Message
    ),
    key=lambda t: t.__name__,
)


def sample_value(annotation: Any) -> Any:
    """A valid value for a field of type ``annotation`` (the first of a union, one element
    of a list, so that nested models travel too)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return args[0]
    if origin in (Union, types.UnionType):
        return sample_value(next(a for a in args if a is not type(None)))
    if origin is list:
        return [sample_value(args[0])]
    if origin is dict:
        return {sample_value(args[0]): sample_value(args[1])}
    if origin is typing.Annotated:
        return sample_value(args[0])
    if annotation is Any or annotation is str:
        return "x"
    if annotation is bool:
        return True
    if annotation is int:
        return 1
    if annotation is float:
        return 0.5
    if annotation is datetime:
        return datetime.now(UTC)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return sample(annotation)
    raise TypeError(f"no sample for {annotation!r}: teach sample_value")


def sample(cls: type[BaseModel], **given: Any) -> Any:
    """An instance of ``cls`` with every required field filled (and ``given``)."""
    fields = {
        name: sample_value(f.annotation)
        for name, f in cls.model_fields.items()
        if f.is_required() and name not in given
    }
    return cls(**fields, **given)


def newer(cls: type[Message]) -> type[Message]:
    """``cls`` as a newer release writes it: with a field this release does not know."""
    return create_model(  # type: ignore[no-any-return,call-overload]
        f"Newer{cls.__name__}",
        __base__=cls,
        added_later=(str, "a field of a later release"),
    )


def test_every_message_type_is_sampled() -> None:
    # Found by looking, so that a message type added later is held to the rules too.
    assert {
        "GenerateBatch",
        "CandidatesProposed",
        "CandidatesScreened",
        "RespondToCandidates",
        "BatchCompleted",
        "JobEvent",
        "DatasetExported",
        "AdapterPublished",
    } <= {t.__name__ for t in MESSAGE_TYPES}
    for cls in MESSAGE_TYPES:
        assert type(sample(cls)) is cls


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
async def test_every_message_type_reads_a_newer_minor_and_refuses_a_newer_major(
    backend: Backend, cls: type[Message]
) -> None:
    bus = backend.make(max_deliveries=3)
    got: list[Message] = []
    bus.subscribe(cls, recorder(got), group="consumer")
    await bus.start()
    letters: list[tuple[str, bytes, dict[str, Any]]] = []
    await bus.consume_dead_letters(dead_letter_recorder(letters))
    later = newer(cls)
    base = sample(cls).model_dump()
    minor = later(**{**base, "schema_version": "1.2", "message_id": "minor"})
    major = later(**{**base, "schema_version": "2.0", "message_id": "major"})
    assert json.loads(minor.model_dump_json())["added_later"]  # it is on the wire

    await bus.publish(minor)
    await bus.publish(major)
    await wait_until(lambda: len(got) == 1 and len(letters) == 1, WITHIN, "both settled")
    await asyncio.sleep(SETTLE)

    # 1.2 with a field unknown here: handled normally, the unknown field ignored.
    [m] = got
    assert type(m) is cls
    assert m.message_id == "minor" and m.schema_version == "1.2"
    assert not hasattr(m, "added_later")
    assert m.model_dump(exclude={"message_id", "schema_version"}) == {
        k: v for k, v in base.items() if k not in ("message_id", "schema_version")
    }
    # 2.0: never given to the handler, dead-lettered at once with the reason.
    [(_, body, headers)] = letters
    assert json.loads(body)["message_id"] == "major"
    assert headers["x-first-death-reason"] == "rejected"
    assert "unknown major version 2" in headers["x-dead-letter-reason"]


async def test_unknown_fields_inside_nested_models_are_ignored(backend: Backend) -> None:
    newer_candidate = create_model(
        "NewerCandidate", __base__=Candidate, score=(float, 0.9), tags=(list[str], ["new"])
    )
    newer_stats = create_model("NewerBatchStats", __base__=BatchStats, gpu_seconds=(float, 1.5))

    class NewerProposed(CandidatesProposed):
        candidates: list[newer_candidate]  # type: ignore[valid-type]
        stats: newer_stats = newer_stats()  # type: ignore[valid-type]

    bus = backend.make()
    got: list[CandidatesProposed] = []
    bus.subscribe(CandidatesProposed, recorder(got), group="dedupe")
    await bus.start()
    sent = NewerProposed(
        schema_version="1.3",
        job_id="j",
        task_id="t",
        instructor="general",
        threshold=0.9,
        candidates=[newer_candidate(instruction="one"), newer_candidate(instruction="two")],
    )
    body = json.loads(sent.model_dump_json())
    assert body["candidates"][0]["score"] == 0.9 and body["stats"]["gpu_seconds"] == 1.5
    await bus.publish(sent)
    await wait_until(lambda: len(got) == 1, WITHIN, "the message")
    [m] = got
    assert [c.instruction for c in m.candidates] == ["one", "two"]
    assert type(m.candidates[0]) is Candidate and type(m.stats) is BatchStats
    assert not hasattr(m.candidates[0], "score") and not hasattr(m.stats, "gpu_seconds")


class LegacyPing(Ping):
    """Ping as the release before "MAJOR.MINOR" wrote it: ``schema_version`` 1."""

    @model_serializer(mode="wrap")
    def _as_integer(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        data["schema_version"] = 1
        return data


async def test_a_legacy_integer_version_is_read_as_1_0(backend: Backend) -> None:
    bus = backend.make()
    got: list[Ping] = []
    bus.subscribe(Ping, recorder(got), group="g")
    await bus.start()
    legacy = LegacyPing(n=7)
    assert json.loads(legacy.model_dump_json())["schema_version"] == 1
    await bus.publish(legacy)
    await wait_until(lambda: len(got) == 1, WITHIN, "the message")
    assert got[0].schema_version == "1.0" and got[0].n == 7


class BrokenPing(Ping):
    """A body that is JSON of this release's version but not a valid Ping."""

    @model_serializer(mode="wrap")
    def _broken(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        data["n"] = "not a number"
        return data


async def test_a_body_that_does_not_parse_is_dead_lettered_at_once(backend: Backend) -> None:
    bus = backend.make(max_deliveries=5)
    got: list[Ping] = []
    bus.subscribe(Ping, recorder(got), group="g")
    await bus.start()
    letters: list[tuple[str, bytes, dict[str, Any]]] = []
    await bus.consume_dead_letters(dead_letter_recorder(letters))
    await bus.publish(BrokenPing(n=1))
    await wait_until(lambda: len(letters) == 1, WITHIN, "the dead letter")
    await asyncio.sleep(SETTLE)
    assert got == []
    [(_, body, headers)] = letters
    assert json.loads(body)["n"] == "not a number"
    assert headers["x-first-death-reason"] == "rejected"
    assert headers["x-dead-letter-reason"]


# --- helpers --------------------------------------------------------------------------------


async def message_count(bus: Bus, queue: str) -> int:
    # Not part of the port (tooling and tests); both adapters have it.
    count: int = await bus.message_count(queue)  # type: ignore[attr-defined]
    return count


async def wait_until_async(
    count: Callable[[], Any], expected: int, what: str, within: float = WITHIN
) -> None:
    """Poll the coroutine function ``count`` until it returns ``expected``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (value := await count()) != expected:
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}: {value}")
        await asyncio.sleep(0.05)
