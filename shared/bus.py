"""The in-process bus: asyncio queues with the delivery contract of the real broker.

Delivery is at least once: a handler that raises gets its message again (up to
``max_deliveries``), then the message is dead-lettered and kept in ``dead_letters``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, cast

from airoboros import telemetry
from airoboros.contracts import Message
from airoboros.ports import Handler, M

log = logging.getLogger(__name__)


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
    def __init__(self, *, max_deliveries: int = 3) -> None:
        self.max_deliveries = max_deliveries
        self._subs: dict[str, list[_Subscription]] = defaultdict(list)
        self._queues: dict[int, asyncio.Queue[tuple[Message, int]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
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
            try:
                with telemetry.consuming(message, message.headers, delivery):
                    await sub.handler(message)
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
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
