"""Ports: the small interfaces through which the code reaches every external system.

Each port has one real adapter per backend. The embedded adapters (in-process bus,
SQLite, local folder, faiss) are supported backends in their own right, and are what
the unit tests use; nothing here is mocked.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt

from airoboros.contracts import Message

M = TypeVar("M", bound=Message)
Handler = Callable[[M], Awaitable[None]]
Vectors = npt.NDArray[np.float32]


@runtime_checkable
class Bus(Protocol):
    """Publish/subscribe with at-least-once delivery.

    Messages travel on their type's ``topic``. Subscriptions with the same ``group`` (a
    service name) share the messages of a topic, each going to one of them (competing
    consumers, e.g. replicas); every group gets its own copy (fan-out).

    A handler that returns normally acknowledges its message, after its effects are
    durable; one that raises gets the message redelivered, up to ``max_deliveries``, after
    which it is dead-lettered. Handlers must therefore be idempotent (keyed by
    ``message_id``).

    Messages whose ``partition_key()`` is not None are, for a topic the bus partitions,
    handled by at most one consumer at a time per partition (all messages of one key go
    to one partition), so a handler can check-then-write without racing its replicas.
    """

    async def publish(self, message: Message) -> None: ...

    def subscribe(
        self,
        message_type: type[M],
        handler: Handler[M],
        *,
        concurrency: int = 1,
        group: str = "default",
    ) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class ObjectStore(Protocol):
    """Blobs by key. A reader never sees a partially written object."""

    async def put_bytes(self, key: str, data: bytes) -> str:
        """Store ``data`` under ``key`` atomically; returns the object's URI."""
        ...

    async def get_bytes(self, key: str) -> bytes: ...

    async def exists(self, key: str) -> bool: ...

    async def list(self, prefix: str = "") -> list[str]: ...

    async def delete(self, key: str) -> None: ...


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
