"""The in-process bus: asyncio queues with the delivery contract of the real broker.

``InMemoryBus`` keeps the observable contract of ``airoboros.bus_amqp.AmqpBus`` (the
``Bus`` port; tests/contract holds both to it): one queue per (topic, group), consumers
of one group compete and each group gets a copy; partitioned topics have one queue per
partition, each with a single active consumer that handles its messages one at a time;
messages cross as JSON bytes and are parsed per delivery; delivery is at least once: a
handler that raises gets its message again (up to ``max_deliveries``), then the message
is dead-lettered into ``<queue>.dlq`` (for ``consume_dead_letters``) and recorded in
``dead_letters``.

Also here, for both buses: the queue topology (``Topology``), the partition of a key
(``partition_of``) and the decoding of a body with its refusal rules (``decode``).

An outage is not a failure of the message: a handler that raises because a dependency is
down for now (``airoboros.errors.is_unavailable``: the database, the broker, the object
store, Redis) is run again in place, with backoff, its message kept and no delivery
spent, for up to ``OUTAGE_PATIENCE`` seconds; only past that does the message take the
failure path above. ``handle_through_outages`` does this for both buses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import zlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

from airoboros import telemetry
from airoboros.contracts import SCHEMA_VERSION, Message
from airoboros.errors import BusError, is_unavailable
from airoboros.ports import Bus, DeadLetterHandler, Handler, M

log = logging.getLogger(__name__)

#: Seconds a message whose handler keeps meeting an outage is retried in place (counted
#: from its first attempt) before it takes the failure path (redelivery, then dead
#: letter). Well under RabbitMQ's 30-minute consumer ack timeout, which would otherwise
#: close the channel and count the delivery anyway.
OUTAGE_PATIENCE = 600.0
#: (first, largest) wait in seconds between two in-place attempts; it doubles each time.
OUTAGE_BACKOFF = (0.5, 10.0)


async def _sleep(seconds: float) -> bool:
    await asyncio.sleep(seconds)
    return True


async def handle_through_outages(
    attempt: Callable[[int], Awaitable[None]],
    *,
    topic: str,
    message_id: str,
    patience: float = OUTAGE_PATIENCE,
    backoff: tuple[float, float] = OUTAGE_BACKOFF,
    pause: Callable[[float], Awaitable[bool]] = _sleep,
) -> int:
    """Run ``attempt(n)`` (n = 1, 2, ...) until it returns; returns the number of attempts.

    While it raises an error for which ``is_unavailable`` is true, wait (``backoff``,
    doubling) and run it again, for up to ``patience`` seconds from the first attempt;
    each wait is logged at WARNING with the topic and the cause. Any other error, an
    outage outlasting the patience, or a ``pause`` that returns False (the caller can no
    longer settle the message: it is closing, or the channel went away) re-raises the
    last error, for the caller's failure path. Handlers are idempotent by contract, so
    running one again after a partial attempt is safe."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    delay, cap = backoff
    n = 0
    while True:
        n += 1
        try:
            await attempt(n)
            return n
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            left = deadline - loop.time()
            if left <= 0:
                log.error(
                    "%s: a dependency is still unavailable after %.0fs (%s: %s); giving "
                    "message %s the failure path",
                    topic,
                    patience,
                    type(exc).__name__,
                    exc,
                    message_id,
                )
                raise
            wait = min(delay, left)
            log.warning(
                "%s: a dependency is unavailable (%s: %s); message %s kept, trying again "
                "in %.1fs (attempt %d)",
                topic,
                type(exc).__name__,
                exc,
                message_id,
                wait,
                n,
            )
            if not await pause(wait):
                raise
            delay = min(delay * 2, cap)


# --- what both buses share ---------------------------------------------------------------

#: The schema MAJOR this release reads; messages of any other are refused.
SCHEMA_MAJOR = Message.version_parts(SCHEMA_VERSION)[0]


def partition_of(key: str, partitions: int) -> int:
    """The partition of ``key`` among ``partitions``: stable across processes and
    Python versions (crc32, unlike ``hash``, is not salted per process)."""
    return zlib.crc32(key.encode("utf-8")) % partitions


class Topology:
    """Queue names and routing keys, the same for every bus with the same ``prefix`` and
    ``partitions`` (publisher and subscribers must be given the same).

    A subscription (topic, group) has the queue ``<prefix>.<group>.<topic>``, bound with
    the topic as routing key; on a topic partitioned N ways (N > 1) it has N queues
    ``<prefix>.<group>.<topic>.p<k>``, bound with ``<topic>.p<k>``. Each queue dead-letters
    into ``<queue>.dlq``."""

    def __init__(self, prefix: str, partitions: dict[str, int] | None = None) -> None:
        for topic, n in (partitions or {}).items():
            if n < 1:
                raise ValueError(f"partitions[{topic!r}] must be at least 1, got {n}")
        self.prefix = prefix
        #: topic -> partitions, for the topics split in more than one
        self.partitions = {t: n for t, n in (partitions or {}).items() if n > 1}

    def partitioned(self, topic: str) -> bool:
        return topic in self.partitions

    def queues(self, topic: str, group: str) -> list[tuple[str, str]]:
        """(queue name, routing key) of each queue of subscription (topic, group)."""
        if not topic:
            raise ValueError("message type has no topic")
        base = f"{self.prefix}.{group}.{topic}"
        n = self.partitions.get(topic, 1)
        if n == 1:
            return [(base, topic)]
        return [(f"{base}.p{k}", f"{topic}.p{k}") for k in range(n)]

    def routing_key(self, message: Message) -> str:
        """Where ``message`` is published: its topic, or its topic's partition."""
        n = self.partitions.get(message.topic, 1)
        if n == 1:
            return message.topic
        key = message.partition_key()
        # Keyless messages of a partitioned topic still need one home: partition 0.
        return f"{message.topic}.p{0 if key is None else partition_of(key, n)}"


class Refused(ValueError):
    """A body that no handler may get: dead-letter it at once, never retry it."""


def version_problem(version: object) -> str | None:
    """Why a message of ``schema_version`` ``version`` is refused, or None if this
    release reads it (same MAJOR, any MINOR: unknown fields are ignored)."""
    try:
        major, minor = Message.version_parts(version)
    except ValueError as exc:
        return str(exc)
    if major != SCHEMA_MAJOR:
        return (
            f"schema_version {major}.{minor}: unknown major version {major} "
            f"(this release reads {SCHEMA_MAJOR}.x)"
        )
    return None


def body_problem(body: bytes) -> str | None:
    """What is wrong with ``body`` whatever its message type: not a JSON object, or a
    ``schema_version`` this release does not read. None if neither."""
    try:
        data = json.loads(body)
    except ValueError as exc:  # also a body that is not UTF-8
        return f"the body is not JSON ({exc})"
    if not isinstance(data, dict):
        return f"the body is not a JSON object but {type(data).__name__}"
    if "schema_version" in data:
        return version_problem(data["schema_version"])
    return None


def decode(message_type: type[M], body: bytes) -> M:
    """Parse a body from the wire as ``message_type``, refusing what this release cannot
    read: raises ``Refused`` (with the reason) for an unknown schema MAJOR, a body that
    is not JSON, or one that does not validate as ``message_type``. Unknown fields are
    ignored (``Message`` is a tolerant reader)."""
    try:
        message = message_type.model_validate_json(body)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        # The version first: a newer MAJOR may well fail validation, and that is why.
        reason = body_problem(body) or f"does not parse as {message_type.__name__}: {exc}"
        raise Refused(reason) from exc
    problem = version_problem(message.schema_version)
    if problem is not None:
        raise Refused(problem)
    return message


# --- the in-process bus ---------------------------------------------------------------------


@dataclass
class DeadLetter:
    """A message that was dead-lettered: ``message`` as parsed (None when it was refused
    unparsed), why (``error``), after how many deliveries, the dead-letter queue it went
    to, and its body and headers as ``consume_dead_letters`` handlers get them."""

    message: Message | None
    error: str
    deliveries: int
    queue: str = ""
    body: bytes = b""
    headers: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Delivery:
    body: bytes
    headers: dict[str, Any]
    routing_key: str
    message_id: str
    #: which delivery of the message this is (1 for the first)
    count: int = 1


class _Queue:
    def __init__(self, name: str) -> None:
        self.name = name
        self.items: asyncio.Queue[_Delivery] = asyncio.Queue()
        #: consumer tasks on it; drain() waits only for queues that have some
        self.consumers = 0


@dataclass
class _MemorySubscription:
    message_type: type[Message]
    handler: Handler[Any]
    concurrency: int
    group: str
    queues: list[str]
    partitioned: bool
    semaphore: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.semaphore = asyncio.Semaphore(self.concurrency)


class InMemoryBus:
    """``Bus`` in one process (the embedded default, and what unit tests use).

    The same topology as ``AmqpBus`` under the same ``prefix`` and ``partitions``
    (``Topology``): queues are declared by ``subscribe`` and ``ensure_queue``, and a
    message goes to every queue bound to its routing key, as JSON bytes with its headers
    (``x-schema-version`` and the W3C trace context). Consumers of one queue compete;
    a partition's queue is consumed by the first subscription of its group only (single
    active consumer), one message at a time.

    Where it differs, it is in what a single process cannot lose: queues live as long as
    the bus, ``publish`` never waits, a publish before ``start`` waits in its queues for
    ``start``, and ``close`` cancels handlers still running (their messages die with the
    process). ``drain`` waits until nothing is left to handle.
    """

    def __init__(
        self,
        *,
        prefix: str = "airoboros",
        max_deliveries: int = 3,
        partitions: dict[str, int] | None = None,
        dead_letter_retry_delay: float = 1.0,
        outage_patience: float = OUTAGE_PATIENCE,
        outage_backoff: tuple[float, float] = OUTAGE_BACKOFF,
    ) -> None:
        if max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        self.topology = Topology(prefix, partitions)
        self.max_deliveries = max_deliveries
        self.dead_letter_retry_delay = dead_letter_retry_delay
        self.outage_patience = outage_patience
        self.outage_backoff = outage_backoff
        self._subs: list[_MemorySubscription] = []
        self._queues: dict[str, _Queue] = {}
        #: routing key -> names of the queues bound with it
        self._bindings: dict[str, list[str]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closed = False
        #: every message dead-lettered so far, oldest first
        self.dead_letters: list[DeadLetter] = []
        # Deliveries taken from a queue and not settled yet; drain() waits for zero, and
        # for every consumed queue to be empty.
        self._running = 0
        self._changed = asyncio.Event()

    # --- names ---------------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        return self.topology.prefix

    @property
    def partitions(self) -> dict[str, int]:
        return self.topology.partitions

    def queue_names(self, message_type: type[Message], group: str = "default") -> list[str]:
        return [q for q, _ in self.topology.queues(message_type.topic, group)]

    def routing_key(self, message: Message) -> str:
        return self.topology.routing_key(message)

    def dead_letter_queues(self) -> list[str]:
        """The dead-letter queues of every subscription of this bus."""
        return [f"{q}.dlq" for sub in self._subs for q in sub.queues]

    @property
    def connected(self) -> bool:
        """Whether the bus can deliver now (for readiness): started and not closed."""
        return self._started and not self._closed

    # --- Bus -----------------------------------------------------------------------------

    def subscribe(
        self,
        message_type: type[M],
        handler: Handler[M],
        *,
        concurrency: int = 1,
        group: str = "default",
    ) -> None:
        if self._started:
            raise RuntimeError("subscribe before start()")
        self._subs.append(
            _MemorySubscription(
                message_type=message_type,
                handler=cast(Handler[Any], handler),
                concurrency=max(1, concurrency),
                group=group,
                queues=self._declare(message_type.topic, group),
                partitioned=self.topology.partitioned(message_type.topic),
            )
        )

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("start() called twice")
        self._started = True
        active: set[str] = set()
        for sub in self._subs:
            for name in sub.queues:
                q = self._queues[name]
                if not sub.partitioned:
                    for _ in range(sub.concurrency):
                        self._spawn(q, self._consume(sub, q))
                elif name not in active:
                    # Single active consumer: the first subscription of the group holds
                    # the partition, and handles its messages one after another.
                    active.add(name)
                    self._spawn(q, self._consume(sub, q))

    async def publish(self, message: Message) -> None:
        routing_key = self.topology.routing_key(message)
        names = self._bindings.get(routing_key, [])
        headers: dict[str, Any] = dict(message.headers)
        headers["x-schema-version"] = message.schema_version
        with telemetry.publishing(message, headers):
            # Serialised once, parsed per delivery: handlers get their own objects and
            # what they get has crossed the same wire format as on the broker.
            body = message.model_dump_json().encode("utf-8")
            for name in names:
                delivery = _Delivery(body, dict(headers), routing_key, message.message_id)
                self._put(self._queues[name], delivery)
        if not names:
            log.warning(
                "no queue bound for %s (routing key %s); message %s dropped",
                message.topic,
                routing_key,
                message.message_id,
            )

    async def ensure_queue(self, message_type: type[Message], *, group: str = "default") -> None:
        self._require_started()
        self._declare(message_type.topic, group)

    async def consume_dead_letters(
        self, handler: DeadLetterHandler, *, queues: Sequence[str] | None = None
    ) -> list[str]:
        self._require_started()
        names = list(queues) if queues is not None else self.dead_letter_queues()
        for name in names:
            q = self._queue(name)
            self._spawn(q, self._consume_dead_letters(handler, q))
        return names

    async def message_count(self, queue_name: str) -> int:
        """Messages ready in ``queue_name`` (not counting those being handled), as
        ``AmqpBus.message_count``. Raises ``BusError`` if the queue does not exist."""
        q = self._queues.get(queue_name)
        if q is None:
            raise BusError(f"no queue named {queue_name!r}")
        return q.items.qsize()

    async def drain(self) -> None:
        """Wait until no message is queued for a consumer and no handler is running,
        including the follow-up messages that handlers publish on the way. (Messages kept
        for a group without a consumer here, see ``ensure_queue``, do not count.)"""
        while not self._quiet():
            self._changed.clear()
            await self._changed.wait()

    async def close(self) -> None:
        self._closed = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # --- internals -----------------------------------------------------------------------

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("start() the bus first")

    def _queue(self, name: str) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = _Queue(name)
        return q

    def _declare(self, topic: str, group: str) -> list[str]:
        names = []
        for name, routing_key in self.topology.queues(topic, group):
            self._queue(name)
            self._queue(f"{name}.dlq")
            bound = self._bindings.setdefault(routing_key, [])
            if name not in bound:
                bound.append(name)
            names.append(name)
        return names

    def _spawn(self, q: _Queue, work: Awaitable[None]) -> None:
        q.consumers += 1
        self._tasks.append(asyncio.ensure_future(work))

    def _put(self, q: _Queue, delivery: _Delivery) -> None:
        q.items.put_nowait(delivery)
        self._changed.set()

    def _quiet(self) -> bool:
        return self._running == 0 and all(
            q.items.empty() for q in self._queues.values() if q.consumers
        )

    @contextlib.contextmanager
    def _running_one(self) -> Iterator[None]:
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1
            self._changed.set()

    async def _consume(self, sub: _MemorySubscription, q: _Queue) -> None:
        while True:
            delivery = await q.items.get()
            # Counted before any await: drain() must never see it neither queued nor
            # running.
            with self._running_one():
                if sub.partitioned:
                    async with sub.semaphore:
                        await self._handle(sub, q, delivery)
                else:
                    await self._handle(sub, q, delivery)

    async def _handle(self, sub: _MemorySubscription, q: _Queue, delivery: _Delivery) -> None:
        try:
            message = decode(sub.message_type, delivery.body)
        except Refused as exc:
            log.error(
                "refused a message on %s (message_id=%s): %s; dead-lettering it",
                q.name,
                delivery.message_id,
                exc,
            )
            self._dead_letter(q, delivery, None, "rejected", str(exc))
            return

        def attempt(n: int) -> Awaitable[None]:
            # A retry in place parses the body again: a pristine message, as a redelivery.
            return sub.handler(
                message if n == 1 else sub.message_type.model_validate_json(delivery.body)
            )

        try:
            with telemetry.consuming(message, delivery.headers, delivery.count):
                await handle_through_outages(
                    attempt,
                    topic=message.topic,
                    message_id=message.message_id,
                    patience=self.outage_patience,
                    backoff=self.outage_backoff,
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if delivery.count >= self.max_deliveries:
                log.error(
                    "handler for %s failed on %s (delivery %d of %d): %r; dead-lettering it",
                    q.name,
                    message.message_id,
                    delivery.count,
                    self.max_deliveries,
                    exc,
                )
                self._dead_letter(q, delivery, message, "delivery_limit", repr(exc))
            else:
                log.warning(
                    "handler for %s failed on %s (delivery %d of %d): %r; redelivering",
                    q.name,
                    message.message_id,
                    delivery.count,
                    self.max_deliveries,
                    exc,
                )
                self._put(q, replace(delivery, count=delivery.count + 1))

    def _dead_letter(
        self,
        q: _Queue,
        delivery: _Delivery,
        message: Message | None,
        reason: str,
        error: str,
    ) -> None:
        # The headers RabbitMQ adds on dead-lettering (in part), and the reason in words.
        headers = {
            **delivery.headers,
            "x-first-death-reason": reason,
            "x-first-death-queue": q.name,
            "x-dead-letter-reason": error,
        }
        dlq = self._queue(f"{q.name}.dlq")
        self.dead_letters.append(
            DeadLetter(message, error, delivery.count, dlq.name, delivery.body, headers)
        )
        self._put(dlq, replace(delivery, headers=headers, count=1))

    async def _consume_dead_letters(self, handler: DeadLetterHandler, q: _Queue) -> None:
        while True:
            delivery = await q.items.get()

            def attempt(_: int, d: _Delivery = delivery) -> Awaitable[None]:
                return handler(q.name, d.body, dict(d.headers))

            with self._running_one():
                try:
                    await handle_through_outages(
                        attempt,
                        topic=q.name,
                        message_id=delivery.message_id,
                        patience=self.outage_patience,
                        backoff=self.outage_backoff,
                    )
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("dead-letter handler failed on %s; requeueing", q.name)
                    # A pause, or a handler that always fails would spin on the message.
                    await asyncio.sleep(self.dead_letter_retry_delay)
                    self._put(q, delivery)


if TYPE_CHECKING:

    def _conforms(bus: InMemoryBus) -> Bus:  # mypy checks the adapter against the port here
        return bus
