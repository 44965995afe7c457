"""The in-process bus: asyncio queues with the delivery contract of the real broker.

Delivery is at least once: a handler that raises gets its message again (up to
``max_deliveries``), then the message is dead-lettered and kept in ``dead_letters``.

An outage is not a failure of the message: a handler that raises because a dependency is
down for now (``airoboros.errors.is_unavailable``: the database, the broker, the object
store, Redis) is run again in place, with backoff, its message kept and no delivery
spent, for up to ``OUTAGE_PATIENCE`` seconds; only past that does the message take the
failure path above. ``handle_through_outages`` does this for both buses.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from airoboros import telemetry
from airoboros.contracts import Message
from airoboros.errors import is_unavailable
from airoboros.ports import Handler, M

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


@dataclass
class DeadLetter:
    message: Message
    error: str
    deliveries: int


@dataclass
class _Subscription:
    message_type: type[Message]
    handler: Handler[Any]
    concurrency: int


class InMemoryBus:
    def __init__(
        self,
        *,
        max_deliveries: int = 3,
        outage_patience: float = OUTAGE_PATIENCE,
        outage_backoff: tuple[float, float] = OUTAGE_BACKOFF,
    ) -> None:
        self.max_deliveries = max_deliveries
        self.outage_patience = outage_patience
        self.outage_backoff = outage_backoff
        self._subs: dict[str, list[_Subscription]] = defaultdict(list)
        self._queues: dict[int, asyncio.Queue[tuple[Message, int]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closed = False
        self.dead_letters: list[DeadLetter] = []
        # Deliveries queued or being handled; drain() waits for zero.
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def subscribe(
        self, message_type: type[M], handler: Handler[M], *, concurrency: int = 1
    ) -> None:
        if self._started:
            raise RuntimeError("subscribe before start()")
        self._subs[message_type.topic].append(
            _Subscription(message_type, cast(Handler[Any], handler), max(1, concurrency))
        )

    @property
    def connected(self) -> bool:
        """Whether the bus can deliver now (for readiness): started and not closed."""
        return self._started and not self._closed

    async def start(self) -> None:
        self._started = True
        for subs in self._subs.values():
            for sub in subs:
                q: asyncio.Queue[tuple[Message, int]] = asyncio.Queue()
                self._queues[id(sub)] = q
                for _ in range(sub.concurrency):
                    self._tasks.append(asyncio.create_task(self._consume(sub, q)))

    async def publish(self, message: Message) -> None:
        subs = self._subs.get(message.topic, [])
        if not subs:
            log.warning("no subscriber for %s; message dropped", message.topic)
        headers = dict(message.headers)
        with telemetry.publishing(message, headers):
            for sub in subs:
                # Each subscriber gets its own copy, as with a fan-out exchange.
                copy = message.model_copy(deep=True, update={"headers": dict(headers)})
                self._enqueue(self._queues[id(sub)], copy, 1)

    def _enqueue(
        self, q: asyncio.Queue[tuple[Message, int]], message: Message, delivery: int
    ) -> None:
        self._pending += 1
        self._idle.clear()
        q.put_nowait((message, delivery))

    async def _consume(self, sub: _Subscription, q: asyncio.Queue[tuple[Message, int]]) -> None:
        while True:
            message, delivery = await q.get()

            def attempt(_: int, message: Message = message) -> Awaitable[None]:
                # The same object, as a redelivery here gets (handlers do not mutate it).
                return sub.handler(message)

            try:
                with telemetry.consuming(message, message.headers, delivery):
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
                if delivery >= self.max_deliveries:
                    log.error(
                        "dead-lettered %s %s after %d deliveries: %s",
                        message.topic,
                        message.message_id,
                        delivery,
                        exc,
                    )
                    self.dead_letters.append(DeadLetter(message, repr(exc), delivery))
                else:
                    log.warning("redelivering %s after error: %s", message.topic, exc)
                    self._enqueue(q, message, delivery + 1)
            finally:
                q.task_done()
                self._pending -= 1
                if self._pending == 0:
                    self._idle.set()

    async def drain(self) -> None:
        """Wait until no message is queued and no handler is running, including the
        follow-up messages that handlers publish on the way."""
        await self._idle.wait()

    async def close(self) -> None:
        self._closed = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
