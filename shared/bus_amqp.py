"""The RabbitMQ adapter of the ``Bus`` port, on aio-pika.

Topology (all durable; ``P`` is the ``prefix``):

- one topic exchange ``P``; a message is published with its type's ``topic`` as routing
  key (``<topic>.p<k>`` on a partitioned topic, see below);
- per subscription (message type, group) a quorum queue ``P.<group>.<topic>`` bound to
  ``P`` with the topic as binding key, so every group gets its own copy (fan-out) and the
  consumers of one group compete for it (replicas);
- one direct exchange ``P.dlx``; each queue dead-letters into ``<queue>.dlq``, bound to
  ``P.dlx`` with the queue's name as routing key.

Delivery is at least once. A message is acknowledged only after its handler returned;
a handler that raises gets it back (``basic.nack`` with requeue) and the quorum queue
counts the delivery: after ``max_deliveries`` deliveries it dead-letters the message. A
body this release refuses (``airoboros.bus.decode``: an unknown schema MAJOR, or a body
that does not parse as the subscription's type) is rejected at once (dead-lettered, never
retried), its reason logged. The
broker also counts a delivery that was never settled because the consumer's channel went
away (a crash, a shutdown, a broker restart), so these use up the budget too.

Partitioned topics (``partitions={"dedupe.screen": 4}``): a message whose
``partition_key()`` is not None goes to partition ``crc32(key) % N`` (partition 0 when
the key is None), a queue ``P.<group>.<topic>.p<k>`` with single active consumer: of all
the consumers on it, across replicas, the broker feeds one at a time, and the adapter
handles that partition's messages one after another, in the order they arrive. The broker
does not balance partitions over replicas (the first consumer of a partition keeps it
until it goes away), so use at least as many partitions as replicas and expect one
replica to hold several. Publisher and subscribers must be given the same ``partitions``.

Connections are robust (``aio_pika.connect_robust``): after a broker restart they come back
by themselves, redeclare the topology and restore the consumers. Publishing and consuming
use separate connections, as RabbitMQ recommends: flow control blocks a publishing
connection, and it must not hold up the acks of the consumers.

An outage is not a failure of the message: a handler that raises because a dependency is
down (``airoboros.errors.is_unavailable``: the database, Redis, the object store, a
publish that timed out) is run again in place with backoff, its message kept unacked, for
up to ``outage_patience`` seconds (``airoboros.bus.handle_through_outages``). A nack
would spend one of the message's deliveries for each try, and dead-letter it after a
few seconds of outage; only an outage longer than the patience does that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustExchange,
    AbstractRobustQueue,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ChannelPreconditionFailed
from yarl import URL

from airoboros import metrics, telemetry
from airoboros.bus import (
    OUTAGE_BACKOFF,
    OUTAGE_PATIENCE,
    Refused,
    Topology,
    body_problem,
    decode,
    handle_through_outages,
    partition_of,
)
from airoboros.contracts import Message
from airoboros.errors import BusError, BusUnavailable
from airoboros.ports import Bus, DeadLetterHandler, Handler, M

log = logging.getLogger(__name__)

__all__ = ["AmqpBus", "BusError", "BusUnavailable", "DeadLetterHandler", "partition_of"]

# What a publish attempt may fail with while the broker is away or the connection is
# being restored; all of them are worth another try once the channel is back.
_RETRYABLE: tuple[type[BaseException], ...] = (
    *CONNECTION_EXCEPTIONS,
    aiormq.exceptions.DeliveryError,  # the broker nacked the publish (internal error)
    TimeoutError,  # one attempt timed out; the overall deadline is checked separately
)


@dataclass
class _AmqpSubscription:
    message_type: type[Message]
    handler: Handler[Any]
    concurrency: int
    group: str
    #: (queue name, routing key) pairs: one, or one per partition
    queues: list[tuple[str, str]]
    partitioned: bool
    semaphore: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.semaphore = asyncio.Semaphore(self.concurrency)


def _redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    u = URL(url)
    return str(u.with_password("***")) if u.password else str(u)


class AmqpBus:
    """``Bus`` on RabbitMQ (3.10 or newer: quorum queues with delivery limits and
    single active consumer).

    ``subscribe`` before ``start``; ``start`` connects, declares the topology and starts
    consuming; ``close`` stops consuming, lets running handlers finish (up to
    ``close_timeout`` seconds, then cancels them: their messages are redelivered) and
    disconnects.

    ``publish`` returns once the broker has confirmed the message (persistent, on a
    durable exchange, into quorum queues: it is on disk on a majority of nodes). While the
    broker is unreachable it keeps retrying until ``publish_timeout`` seconds have passed,
    then raises ``BusUnavailable``. A retry after a lost confirmation can deliver a message
    twice, which at-least-once delivery allows (handlers are idempotent by
    ``message_id``). A message no queue is bound for is dropped with a warning, as with
    ``InMemoryBus``: consumers' queues exist from their first ``start``, or from
    ``ensure_queue`` in a publisher that must not lose messages sent before them.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "airoboros",
        max_deliveries: int = 5,
        prefetch: int = 16,
        partitions: dict[str, int] | None = None,
        publish_timeout: float = 30.0,
        reconnect_interval: float = 1.0,
        close_timeout: float = 10.0,
        dead_letter_retry_delay: float = 1.0,
        outage_patience: float = OUTAGE_PATIENCE,
        outage_backoff: tuple[float, float] = OUTAGE_BACKOFF,
    ) -> None:
        if max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        self.url = url
        self.topology = Topology(prefix, partitions)
        self.prefix = prefix
        self.max_deliveries = max_deliveries
        self.prefetch = prefetch
        self.partitions = self.topology.partitions
        self.publish_timeout = publish_timeout
        self.reconnect_interval = reconnect_interval
        self.close_timeout = close_timeout
        self.dead_letter_retry_delay = dead_letter_retry_delay
        self.outage_patience = outage_patience
        self.outage_backoff = outage_backoff

        self._subs: list[_AmqpSubscription] = []
        self._started = False
        self._closing = False
        self._pub_conn: AbstractRobustConnection | None = None
        self._con_conn: AbstractRobustConnection | None = None
        self._pub_channel: AbstractRobustChannel | None = None
        self._exchange: AbstractRobustExchange | None = None
        # Strong references: the robust connection holds its channels weakly, and restores
        # after a reconnect only those still alive.
        self._channels: list[AbstractRobustChannel] = []
        self._declare_channel: AbstractRobustChannel | None = None
        self._consumers: list[tuple[AbstractRobustQueue, str]] = []
        self._inflight: set[asyncio.Task[Any]] = set()
        self._declared: set[str] = set()
        self._poll_task: asyncio.Task[None] | None = None
        # Set by close(): handlers waiting out an outage stop waiting.
        self._closed_event = asyncio.Event()

    # --- names -----------------------------------------------------------------------

    @property
    def exchange_name(self) -> str:
        return self.prefix

    @property
    def dead_letter_exchange_name(self) -> str:
        return f"{self.prefix}.dlx"

    def queue_names(self, message_type: type[Message], group: str = "default") -> list[str]:
        """The queue(s) of a subscription: one, or one per partition (in order)."""
        return [q for q, _ in self._queues_for(message_type.topic, group)]

    def dead_letter_queues(self) -> list[str]:
        """The dead-letter queues of every subscription of this bus."""
        return [f"{q}.dlq" for sub in self._subs for q, _ in sub.queues]

    @property
    def declared_queues(self) -> set[str]:
        """Every queue this bus has declared so far (subscriptions' queues and their
        dead-letter queues); for tooling and tests that clean up after themselves."""
        return set(self._declared)

    def _queues_for(self, topic: str, group: str) -> list[tuple[str, str]]:
        return self.topology.queues(topic, group)

    def routing_key(self, message: Message) -> str:
        """Where ``message`` is published: its topic, or its topic's partition."""
        return self.topology.routing_key(message)

    @property
    def connected(self) -> bool:
        """Whether the bus is started, not closing, both its connections are up and every
        channel it publishes or consumes on is open (false while a robust connection is
        being restored). Cheap: reads state only, for readiness probes."""
        if not self._started or self._closing:
            return False
        for conn in (self._pub_conn, self._con_conn):
            if conn is None or conn.is_closed or not conn.connected.is_set():
                return False
        channels = [self._pub_channel, *self._channels]
        return all(ch is not None and _is_open(ch) for ch in channels)

    # --- Bus -------------------------------------------------------------------------

    def subscribe(
        self,
        message_type: type[M],
        handler: Handler[M],
        *,
        concurrency: int = 1,
        group: str = "default",
    ) -> None:
        """Consume ``message_type`` as ``group``; at most ``concurrency`` handlers of this
        subscription run at once (on a partitioned topic: at most one per partition).
        Call before ``start``."""
        if self._started:
            raise RuntimeError("subscribe before start()")
        self._subs.append(
            _AmqpSubscription(
                message_type=message_type,
                handler=cast(Handler[Any], handler),
                concurrency=max(1, concurrency),
                group=group,
                queues=self._queues_for(message_type.topic, group),
                partitioned=message_type.topic in self.partitions,
            )
        )

    async def start(self) -> None:
        """Connect, declare the exchanges and the subscriptions' queues, start consuming.
        Raises ``BusUnavailable`` if the broker cannot be reached now, ``BusError`` if a
        queue exists with other arguments."""
        if self._started:
            raise RuntimeError("start() called twice")
        self._started = True
        try:
            self._pub_conn = await self._connect("publish")
            self._con_conn = await self._connect("consume")
            # Confirms: a publish returns only once the broker has the message safe.
            self._pub_channel = self._pub_conn.channel(publisher_confirms=True)
            await self._pub_channel.initialize()
            self._exchange = await self._declare_exchanges(self._pub_channel)
            for sub in self._subs:
                await self._start_subscription(sub)
            self._poll_task = asyncio.create_task(self._poll_depths())
        except BaseException:
            # Half started is of no use: leave nothing connected or consuming behind.
            await self.close()
            raise

    async def publish(self, message: Message) -> None:
        """Send ``message`` and wait for the broker's confirmation (see the class)."""
        if self._exchange is None or self._pub_channel is None:
            raise RuntimeError("start() the bus before publishing")
        if self._closing:
            raise RuntimeError("the bus is closed")
        routing_key = self.routing_key(message)
        headers: dict[str, Any] = dict(message.headers)
        headers["x-schema-version"] = message.schema_version
        # The W3C trace context of a producer span goes in the AMQP headers.
        with telemetry.publishing(message, headers):
            amqp_message = aio_pika.Message(
                body=message.model_dump_json().encode("utf-8"),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message.message_id,
                type=message.topic,
                timestamp=message.created_at,
                headers=headers,
            )
            result = await self._publish_with_retry(amqp_message, routing_key)
        if not isinstance(result, aiormq.spec.Basic.Ack):
            # mandatory=True and nothing was bound: the broker returned it to us.
            log.warning(
                "no queue bound for %s (routing key %s); message %s dropped",
                message.topic,
                routing_key,
                message.message_id,
            )

    async def close(self) -> None:
        """Stop consuming, wait for running handlers (``close_timeout``), disconnect.
        Messages received but not yet handled go back to their queues."""
        if self._closing:
            return
        self._closing = True
        self._closed_event.set()
        # Cancel the consumers first so that no new delivery arrives while we wait. Bounded:
        # with the broker away a cancel would wait for the reconnection; closing the
        # connection below ends the consumers anyway.
        if self._consumers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    asyncio.gather(
                        *(queue.cancel(tag) for queue, tag in self._consumers),
                        return_exceptions=True,
                    ),
                    timeout=2.0,
                )
        self._consumers.clear()
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(BaseException):
                await self._poll_task
            self._poll_task = None
        running = {t for t in self._inflight if not t.done()}
        if running:
            _, pending = await asyncio.wait(running, timeout=self.close_timeout)
            for t in pending:
                t.cancel()
            if pending:
                log.warning(
                    "cancelled %d handlers still running after %.1fs; their messages "
                    "will be redelivered",
                    len(pending),
                    self.close_timeout,
                )
                await asyncio.gather(*pending, return_exceptions=True)
        for conn in (self._con_conn, self._pub_conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        self._channels.clear()
        self._declare_channel = None
        self._con_conn = self._pub_conn = None
        self._pub_channel = None
        self._exchange = None

    # --- extras ----------------------------------------------------------------------

    async def ensure_queue(self, message_type: type[Message], *, group: str = "default") -> None:
        """Declare the queue(s) of subscription (``message_type``, ``group``) and their
        dead-letter queues without consuming, so that messages published before that
        group's first consumer starts are kept. Call after ``start``."""
        if self._declare_channel is None:
            # One robust channel for these declarations, so they are redone on reconnect.
            self._declare_channel = await self._consumer_channel(prefetch=1)
        channel = self._declare_channel
        exchange = await self._declare_exchanges(channel)
        for queue_name, routing_key in self._queues_for(message_type.topic, group):
            await self._declare_queue(
                channel,
                exchange,
                queue_name,
                routing_key,
                single_active=message_type.topic in self.partitions,
            )

    async def message_count(self, queue_name: str) -> int:
        """Messages ready in ``queue_name`` (not counting those delivered and not yet
        settled). Raises ``BusError`` if the queue does not exist."""
        conn = self._require(self._con_conn)
        # A throwaway, non-robust channel: a passive declare of a missing queue closes it.
        channel = conn.channel(publisher_confirms=False)
        await channel.initialize()
        try:
            queue = await channel.declare_queue(queue_name, passive=True, robust=False)
            return int(queue.declaration_result.message_count or 0)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise BusError(f"no queue named {queue_name!r}") from exc
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def consume_dead_letters(
        self, handler: DeadLetterHandler, *, queues: Sequence[str] | None = None
    ) -> list[str]:
        """Consume dead-letter queues: those of this bus's subscriptions, or the given
        ``queues`` (names of ``*.dlq`` queues made by an ``AmqpBus``; declared if absent).

        For each message calls ``handler(queue_name, body, headers)`` and acknowledges it
        (removing it from the queue) once the handler returned. The headers include the
        broker's ``x-death`` record (queue, reason: ``delivery_limit`` or ``rejected``,
        count), ``x-first-death-reason`` and ``x-schema-version``, and the reason in words,
        ``x-dead-letter-reason`` (for a rejection, what the body's refusal was; the errors
        of a handler that kept failing are in its consumer's log). A handler that raises
        gets the message back into its queue after ``dead_letter_retry_delay`` seconds.
        Consumers of one dead-letter queue compete (each message goes to one of them).
        Runs until ``close``; returns the names of the queues consumed. Call after
        ``start``.
        """
        names = list(queues) if queues is not None else self.dead_letter_queues()
        if not names:
            return []
        channel = await self._consumer_channel(prefetch=self.prefetch)
        for name in names:
            queue = await self._declare(channel, name, self._dead_letter_queue_arguments())

            def on_message(
                incoming: AbstractIncomingMessage, _name: str = name
            ) -> Coroutine[Any, Any, None]:
                return self._tracked(self._on_dead_letter(handler, _name, incoming))

            tag = await queue.consume(on_message)
            self._consumers.append((queue, tag))
        return names

    # --- internals: connection and topology ------------------------------------------

    @staticmethod
    def _require(conn: AbstractRobustConnection | None) -> AbstractRobustConnection:
        if conn is None:
            raise RuntimeError("start() the bus first")
        return conn

    async def _connect(self, role: str) -> AbstractRobustConnection:
        try:
            return await aio_pika.connect_robust(
                self.url,
                client_properties={"connection_name": f"{self.prefix}-{role}"},
                reconnect_interval=self.reconnect_interval,
            )
        except CONNECTION_EXCEPTIONS as exc:
            raise BusUnavailable(f"cannot reach RabbitMQ at {_redact(self.url)}: {exc}") from exc

    async def _consumer_channel(self, *, prefetch: int) -> AbstractRobustChannel:
        channel = self._require(self._con_conn).channel(publisher_confirms=False)
        await channel.initialize()
        # Per consumer (global_=False), and remembered by the robust channel for reconnects.
        await channel.set_qos(prefetch_count=prefetch)
        self._channels.append(channel)
        return channel

    async def _declare_exchanges(self, channel: AbstractRobustChannel) -> AbstractRobustExchange:
        # Declared on every channel that binds to them, because each channel is restored on
        # its own after a reconnect, and a binding needs its exchange to exist.
        exchange = await channel.declare_exchange(
            self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        await channel.declare_exchange(
            self.dead_letter_exchange_name, aio_pika.ExchangeType.DIRECT, durable=True
        )
        return exchange

    def _queue_arguments(self, queue_name: str, *, single_active: bool) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "x-queue-type": "quorum",
            # The broker dead-letters a message once it has been *returned* more times
            # than the limit, i.e. after limit + 1 deliveries; max_deliveries - 1 thus
            # gives the handler exactly max_deliveries tries, as InMemoryBus does.
            "x-delivery-limit": self.max_deliveries - 1,
            "x-dead-letter-exchange": self.dead_letter_exchange_name,
            "x-dead-letter-routing-key": queue_name,
            # At-least-once dead-lettering: the message leaves this queue only once the
            # dead-letter queue has confirmed it (the default, at-most-once, can lose it).
            # It requires reject-publish overflow, which only matters with a length limit.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
        if single_active:
            arguments["x-single-active-consumer"] = True
        return arguments

    @staticmethod
    def _dead_letter_queue_arguments() -> dict[str, Any]:
        # Quorum too: dead letters are what an operator must be able to look at later.
        return {"x-queue-type": "quorum"}

    async def _declare(
        self, channel: AbstractRobustChannel, name: str, arguments: dict[str, Any]
    ) -> AbstractRobustQueue:
        try:
            queue = await channel.declare_queue(name, durable=True, arguments=arguments)
        except ChannelPreconditionFailed as exc:
            raise BusError(
                f"queue {name!r} exists with other arguments than this bus declares "
                f"({exc}); delete it (it is recreated on start) or use another prefix"
            ) from exc
        self._declared.add(name)
        return queue

    async def _declare_queue(
        self,
        channel: AbstractRobustChannel,
        exchange: AbstractRobustExchange,
        queue_name: str,
        routing_key: str,
        *,
        single_active: bool,
    ) -> AbstractRobustQueue:
        # The dead-letter queue first, so that dead-lettering has a target from the start.
        dlq = await self._declare(channel, f"{queue_name}.dlq", self._dead_letter_queue_arguments())
        await dlq.bind(self.dead_letter_exchange_name, routing_key=queue_name)
        queue = await self._declare(
            channel, queue_name, self._queue_arguments(queue_name, single_active=single_active)
        )
        await queue.bind(exchange, routing_key=routing_key)
        return queue

    async def _start_subscription(self, sub: _AmqpSubscription) -> None:
        # One channel per subscription: its prefetch applies to this subscription alone.
        channel = await self._consumer_channel(prefetch=max(self.prefetch, sub.concurrency))
        exchange = await self._declare_exchanges(channel)
        for queue_name, routing_key in sub.queues:
            queue = await self._declare_queue(
                channel, exchange, queue_name, routing_key, single_active=sub.partitioned
            )
            # A partition's messages are handled one at a time, in order of arrival.
            lock = asyncio.Lock() if sub.partitioned else None

            def on_message(
                incoming: AbstractIncomingMessage,
                _sub: _AmqpSubscription = sub,
                _queue: str = queue_name,
                _lock: asyncio.Lock | None = lock,
            ) -> Coroutine[Any, Any, None]:
                return self._tracked(self._on_message(_sub, _queue, _lock, incoming))

            tag = await queue.consume(on_message)
            self._consumers.append((queue, tag))

    # --- internals: publishing --------------------------------------------------------

    async def _publish_with_retry(self, amqp_message: aio_pika.Message, routing_key: str) -> object:
        assert self._exchange is not None and self._pub_channel is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        delay = 0.05
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):
                    # Returns at once while connected; during an outage, once restored.
                    await self._pub_channel.ready()
                    return await self._exchange.publish(
                        amqp_message, routing_key, mandatory=True, timeout=remaining
                    )
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # our caller cancelled us
                # A confirmation future cancelled by a closing channel: the broker went
                # away mid-publish; the message may or may not have arrived.
                exc: BaseException = ConnectionError("channel closed during publish")
            except _RETRYABLE as e:
                exc = e
            if self._closing:
                raise RuntimeError("the bus was closed while publishing") from exc
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BusUnavailable(
                    f"could not publish to RabbitMQ at {_redact(self.url)} within "
                    f"{self.publish_timeout:g}s ({attempt} attempts; last error: "
                    f"{type(exc).__name__}: {exc})"
                ) from exc
            # First failure at warning, the rest quietly: an outage makes many of them.
            log.log(
                logging.WARNING if attempt == 1 else logging.DEBUG,
                "publish to %s failed (%s: %s); retrying for up to %.1fs",
                routing_key,
                type(exc).__name__,
                exc,
                remaining,
            )
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 1.0)

    # --- internals: consuming ---------------------------------------------------------

    async def _tracked(self, work: Awaitable[None]) -> None:
        # aio-pika runs each delivery in its own task; remember it so close() can wait.
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            await work
        finally:
            if task is not None:
                self._inflight.discard(task)

    async def _poll_depths(self) -> None:
        """Every ``metrics.QUEUE_POLL_SECONDS``: the ready messages and consumers of each
        queue this bus declared (a passive declare on a channel of its own, as a missing
        queue closes the channel it is asked on)."""
        channel: Any = None
        while not self._closing:
            try:
                if channel is None or channel.is_closed:
                    assert self._pub_conn is not None
                    channel = await self._pub_conn.channel()
                for name in sorted(self._declared):
                    q = await channel.declare_queue(name, passive=True)
                    result = q.declaration_result
                    metrics.QUEUE_MESSAGES.labels(name).set(result.message_count or 0)
                    metrics.QUEUE_CONSUMERS.labels(name).set(result.consumer_count or 0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("queue depth poll failed: %s", exc)
                channel = None
            await asyncio.sleep(metrics.QUEUE_POLL_SECONDS)
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()

    async def _on_message(
        self,
        sub: _AmqpSubscription,
        queue_name: str,
        lock: asyncio.Lock | None,
        incoming: AbstractIncomingMessage,
    ) -> None:
        # Partition lock before the semaphore: a delivery waiting for its partition must
        # not hold a slot that a delivery of another partition could use.
        async with lock if lock is not None else contextlib.nullcontext(), sub.semaphore:
            await self._handle(sub, queue_name, incoming)

    async def _handle(
        self, sub: _AmqpSubscription, queue_name: str, incoming: AbstractIncomingMessage
    ) -> None:
        if self._closing or not _channel_open(incoming):
            # Closing, or the channel it came on is gone: the broker requeues it anyway,
            # and it could not be acknowledged any more.
            return
        try:
            message = decode(sub.message_type, incoming.body)
        except Refused as exc:
            # Rejected, not requeued: the broker dead-letters it at once (reason
            # "rejected"); no delivery of it could ever succeed.
            log.error(
                "refused a message on %s (message_id=%s): %s; dead-lettering it",
                queue_name,
                incoming.message_id,
                exc,
            )
            await self._settle(incoming.reject(requeue=False), queue_name, "reject")
            return
        topic = sub.message_type.topic
        metrics.MESSAGE_LAG.labels(topic).observe(
            max(0.0, (datetime.now(UTC) - message.created_at).total_seconds())
        )
        delivery = _delivery_count(incoming) + 1
        start = time.perf_counter()

        def attempt(n: int) -> Awaitable[None]:
            # A retry in place decodes the body again: a pristine message, as a redelivery.
            return sub.handler(
                message if n == 1 else sub.message_type.model_validate_json(incoming.body)
            )

        try:
            with telemetry.consuming(message, incoming.headers, delivery):
                await handle_through_outages(
                    attempt,
                    topic=topic,
                    message_id=message.message_id,
                    patience=self.outage_patience,
                    backoff=self.outage_backoff,
                    pause=self._outage_pause(incoming),
                )
        except Exception as exc:
            metrics.HANDLER_SECONDS.labels(topic, "error").observe(time.perf_counter() - start)
            if self._closing or not _channel_open(incoming):
                # It cannot be settled any more: the broker requeues it when the channel
                # closes (and counts that delivery).
                log.warning(
                    "handler for %s failed on %s as the bus closed or its channel went "
                    "away: %r; it will be redelivered",
                    queue_name,
                    message.message_id,
                    exc,
                )
                return
            if delivery >= self.max_deliveries:
                log.error(
                    "handler for %s failed on %s (delivery %d of %d): %r; dead-lettering it",
                    queue_name,
                    message.message_id,
                    delivery,
                    self.max_deliveries,
                    exc,
                )
            else:
                log.warning(
                    "handler for %s failed on %s (delivery %d of %d): %r; redelivering",
                    queue_name,
                    message.message_id,
                    delivery,
                    self.max_deliveries,
                    exc,
                )
            # Requeue: the quorum queue counts the return and dead-letters past the limit.
            await self._settle(incoming.nack(requeue=True), queue_name, "nack")
            return
        metrics.HANDLER_SECONDS.labels(topic, "ok").observe(time.perf_counter() - start)
        await self._settle(incoming.ack(), queue_name, "ack")

    async def _on_dead_letter(
        self, handler: DeadLetterHandler, queue_name: str, incoming: AbstractIncomingMessage
    ) -> None:
        if self._closing or not _channel_open(incoming):
            return
        headers = dict(incoming.headers)
        headers.setdefault("x-dead-letter-reason", _dead_letter_reason(headers, incoming.body))
        try:
            # An outage (the store that records dead letters is down) is waited out in
            # place too: the message stays unacked, not spinning through its queue.
            await handle_through_outages(
                lambda _: handler(queue_name, incoming.body, headers),
                topic=queue_name,
                message_id=str(incoming.message_id),
                patience=self.outage_patience,
                backoff=self.outage_backoff,
                pause=self._outage_pause(incoming),
            )
        except Exception:
            if self._closing or not _channel_open(incoming):
                return  # requeued by the broker with the channel
            log.exception("dead-letter handler failed on %s; requeueing", queue_name)
            # A pause, or a handler that always fails would spin on the same message.
            await asyncio.sleep(self.dead_letter_retry_delay)
            await self._settle(incoming.nack(requeue=True), queue_name, "nack")
            return
        await self._settle(incoming.ack(), queue_name, "ack")

    def _outage_pause(
        self, incoming: AbstractIncomingMessage
    ) -> Callable[[float], Awaitable[bool]]:
        """The wait between two in-place attempts: cut short by close(); False when the
        message can no longer be settled (closing, or its channel went away)."""

        async def pause(seconds: float) -> bool:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed_event.wait(), seconds)
            return not self._closing and _channel_open(incoming)

        return pause

    @staticmethod
    async def _settle(action: Awaitable[None], queue_name: str, what: str) -> None:
        try:
            await action
        except Exception as exc:
            # The channel went away after handling: the broker redelivers the message
            # (handlers are idempotent), so this is worth a warning, not a failure.
            log.warning(
                "could not %s a message of %s (%s); it will be redelivered", what, queue_name, exc
            )


def _dead_letter_reason(headers: dict[str, Any], body: bytes) -> str:
    """Why the broker dead-lettered a message, in words, from its ``x-death`` headers and
    its body: a rejection is always ours (a refused body), and what made it refused is in
    the body; a delivery limit means its handler kept failing (the errors are logged by
    the consumer)."""
    reason = headers.get("x-first-death-reason")
    if isinstance(reason, bytes):
        reason = reason.decode(errors="replace")
    if reason == "rejected":
        return body_problem(body) or "refused: the body does not parse as its queue's type"
    if reason == "delivery_limit":
        return "its handler failed on every delivery up to the delivery limit"
    return f"dead-lettered by the broker ({reason or 'no reason given'})"


def _delivery_count(incoming: AbstractIncomingMessage) -> int:
    """Earlier deliveries of this message, as counted by the quorum queue."""
    value = (incoming.headers or {}).get("x-delivery-count", 0)
    return value if isinstance(value, int) else 0


def _is_open(channel: AbstractRobustChannel) -> bool:
    try:
        return not channel.is_closed
    except aiormq.exceptions.ChannelInvalidStateError:
        return False


def _channel_open(incoming: AbstractIncomingMessage) -> bool:
    """Whether the channel ``incoming`` came on is still open (aio-pika raises rather than
    hand out a closed channel)."""
    try:
        return not incoming.channel.is_closed
    except aiormq.exceptions.ChannelInvalidStateError:
        return False


if TYPE_CHECKING:

    def _conforms(bus: AmqpBus) -> Bus:  # mypy checks the adapter against the port here
        return bus
