"""Ports: the small interfaces through which the code reaches every external system.

Each port has one real adapter per backend. The embedded adapters (in-process bus,
SQLite, local folder, faiss) are supported backends in their own right, and are what
the unit tests use; nothing here is mocked.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt

from airoboros.contracts import Message

M = TypeVar("M", bound=Message)
Handler = Callable[[M], Awaitable[None]]
Vectors = npt.NDArray[np.float32]


#: ``handler(queue_name, body, headers)`` for ``Bus.consume_dead_letters``
DeadLetterHandler = Callable[[str, bytes, dict[str, Any]], Awaitable[None]]


@runtime_checkable
class Bus(Protocol):
    """Publish/subscribe with at-least-once delivery.

    Messages travel on their type's ``topic``. Subscriptions with the same ``group`` (a
    service name) share the messages of a topic, each going to one of them (competing
    consumers, e.g. replicas); every group gets its own copy (fan-out). Each (topic,
    group) has a queue (one per partition on a partitioned topic, see below) that keeps
    the group's messages until one of its consumers takes them; ``queue_names`` names it.

    Messages cross the bus as JSON (``model_dump_json``) and each delivery is parsed
    afresh with the subscription's message type (``model_validate_json``): a handler
    gets its own object, equal field by field to what was published (datetimes, nested
    models and unicode included) with unknown fields ignored. A message whose
    ``schema_version`` MAJOR this release does not know, or whose body does not parse as
    the subscription's type, is never given to a handler: it is dead-lettered at once,
    with no redelivery, and the reason is logged.

    A handler that returns normally acknowledges its message, after its effects are
    durable; one that raises gets the message redelivered, up to ``max_deliveries``
    deliveries in all, after which it is dead-lettered. Handlers must therefore be
    idempotent (keyed by ``message_id``). A handler that raises because a dependency is
    down (``airoboros.errors.is_unavailable``) is run again in place instead, its
    delivery not spent, for up to the bus's outage patience
    (``airoboros.bus.handle_through_outages``).

    Messages whose ``partition_key()`` is not None are, for a topic the bus partitions,
    handled by at most one consumer at a time per partition (all messages of one key go
    to one partition), so a handler can check-then-write without racing its replicas.
    This holds whatever the subscriptions' ``concurrency``.
    """

    @property
    def connected(self) -> bool:
        """Whether the bus can deliver and publish now: started, not closed, and (for a
        broker) connected. Reads state only, for readiness probes."""
        ...

    async def publish(self, message: Message) -> None:
        """Send ``message`` to every group subscribed to its topic (a copy each); returns
        once the bus holds it (for a broker: once it has confirmed it). A message no
        queue is declared for is dropped with a warning. Call after ``start``."""
        ...

    def subscribe(
        self,
        message_type: type[M],
        handler: Handler[M],
        *,
        concurrency: int = 1,
        group: str = "default",
    ) -> None:
        """Consume ``message_type`` as ``group``; at most ``concurrency`` handlers of
        this subscription run at once (on a partitioned topic, at most one per
        partition). Call before ``start``."""
        ...

    async def start(self) -> None:
        """Declare the subscriptions' queues and start consuming."""
        ...

    def queue_names(self, message_type: type[Message], group: str = "default") -> list[str]:
        """The queue(s) of subscription (``message_type``, ``group``): one, or one per
        partition, in partition order. Each has a dead-letter queue ``<name>.dlq``."""
        ...

    async def ensure_queue(self, message_type: type[Message], *, group: str = "default") -> None:
        """Declare the queue(s) of (``message_type``, ``group``) and their dead-letter
        queues without consuming, so that messages published before that group's first
        consumer starts are kept for it. Call after ``start``."""
        ...

    async def consume_dead_letters(
        self, handler: DeadLetterHandler, *, queues: Sequence[str] | None = None
    ) -> list[str]:
        """Consume dead-letter queues: those of this bus's subscriptions, or the given
        ``queues`` (``<queue>.dlq`` names, declared if absent); returns their names.

        For each dead-lettered message calls ``handler(queue_name, body, headers)``:
        the dead-letter queue's name, the message's JSON body as it was published, and
        its headers, which include ``x-first-death-reason`` (``delivery_limit``: its
        handler failed ``max_deliveries`` times; ``rejected``: refused unhandled, e.g. an
        unknown schema MAJOR or a body that does not parse), ``x-schema-version``, and
        ``x-dead-letter-reason`` (why, in words) where the bus knows it: always for a
        refused message. The message leaves its queue once the handler returned; a
        handler that raises gets it again after a pause, and an outage is waited out in
        place. Consumers of one dead-letter queue compete. Runs until ``close``; call
        after ``start``."""
        ...

    async def close(self) -> None:
        """Stop consuming, let running handlers finish (bounded), release everything.
        Messages not yet handled stay queued (a broker redelivers them later)."""
        ...


class ObjectStore(Protocol):
    """Blobs by key. A reader never sees a partially written object.

    Keys are relative paths ("jobs/<id>/export/x.jsonl"); one that would leave the store
    ("../x", "/etc/passwd", ".") raises ValueError."""

    async def put_bytes(self, key: str, data: bytes) -> str:
        """Store ``data`` under ``key`` atomically, replacing what was there: readers see
        the old object or the new one, whole, never a part nor (on overwrite) nothing.
        Returns the object's URI."""
        ...

    async def get_bytes(self, key: str) -> bytes:
        """The object's bytes; ``airoboros.errors.NotFoundError`` if there is none."""
        ...

    async def exists(self, key: str) -> bool: ...

    async def list(self, prefix: str = "") -> list[str]:
        """Keys that start with ``prefix`` (a string prefix, not a folder), sorted."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is no error."""
        ...


class VectorStore(Protocol):
    """Unit vectors by namespace; similarity is cosine (inner product of unit vectors)."""

    async def add(self, namespace: str, ids: Sequence[str], vectors: Vectors) -> None: ...

    async def search(
        self, namespace: str, vectors: Vectors, k: int = 1
    ) -> tuple[npt.NDArray[np.float32], list[list[str]]]:
        """For each query row, the top-``k`` similarities (shape [n, k], -inf-padded) and ids."""
        ...

    async def count(self, namespace: str) -> int: ...

    async def drop(self, namespace: str) -> None: ...


class Embedder(Protocol):
    """Text to unit-length vectors. ``embed`` is CPU/GPU-bound: call it off the event loop."""

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> Vectors:
        """Shape [len(texts), dim], float32, each row L2-normalised."""
        ...
