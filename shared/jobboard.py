"""The job board: what stateless workers need to know of a job besides the message they
hold, kept in Redis by the topics service.

Generator workers need no database: a task carries its job's settings
(``GenerateBatch.settings``), and the board tells them the two things that change while
the task waits in a queue or that must not travel in a message:

* the job's status (running, or ended: cancelled, done, ...), so that a worker drops the
  work of a cancelled or finished job instead of paying for it;
* the job's own API key for its own endpoint, when it has one (a message can be
  dead-lettered, stored and shown; a key must never be).

The topics replica that drives a job writes both when it takes the job and again on every
tick, with an expiry, so a Redis that lost its data is filled again within a tick. A
worker that finds no status waits (the board is "unavailable" for that job) rather than
guess: see ``BoardUnavailable``.
"""

from __future__ import annotations

from typing import Any, Protocol

from airoboros.errors import DependencyUnavailable

#: seconds a running job's entry lives without a refresh from its controller (topics
#: ticks every few seconds; a topics outage shorter than this goes unnoticed)
RUNNING_TTL = 600
#: seconds an ended job's entry lives (messages of an ended job are dropped until then)
ENDED_TTL = 86_400


class BoardUnavailable(DependencyUnavailable):
    """The board has no entry for the job (Redis restarted, and no topics replica has
    written it again yet): the worker keeps its message and asks again later."""


class JobBoard(Protocol):
    async def post(self, job_id: str, status: str, *, api_key: str | None = None) -> None:
        """Write the job's status (and its own key while it runs)."""
        ...

    async def status(self, job_id: str) -> str:
        """The job's status; raises BoardUnavailable when the board does not know it."""
        ...

    async def api_key(self, job_id: str) -> str | None:
        """The job's own API key, if it has one and still runs."""
        ...


class RedisJobBoard:
    """The board in Redis: one hash per job, ``<prefix>:job:<id>`` = {status, key}."""

    def __init__(self, redis: Any, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    async def post(self, job_id: str, status: str, *, api_key: str | None = None) -> None:
        key = self._key(job_id)
        running = status == "running"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, "status", status)
            if running and api_key:
                pipe.hset(key, "key", api_key)
            else:
                pipe.hdel(key, "key")
            pipe.expire(key, RUNNING_TTL if running else ENDED_TTL)
            await pipe.execute()

    async def _get(self, job_id: str, field: str) -> str | None:
        value = await self.redis.hget(self._key(job_id), field)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def status(self, job_id: str) -> str:
        status = await self._get(job_id, "status")
        if status is None:
            raise BoardUnavailable(f"the job board has no status for job {job_id} yet")
        return status

    async def api_key(self, job_id: str) -> str | None:
        return await self._get(job_id, "key")


class InMemoryJobBoard:
    """The board in this process (tests, and a topics service without Redis): the same
    contract as ``RedisJobBoard``, expiry included."""

    def __init__(self, clock: Any = None) -> None:
        import time

        self._clock = clock or time.monotonic
        self._jobs: dict[str, tuple[str, str | None, float]] = {}

    async def post(self, job_id: str, status: str, *, api_key: str | None = None) -> None:
        running = status == "running"
        ttl = RUNNING_TTL if running else ENDED_TTL
        self._jobs[job_id] = (status, api_key if running else None, self._clock() + ttl)

    def _entry(self, job_id: str) -> tuple[str, str | None] | None:
        hit = self._jobs.get(job_id)
        if hit is None or hit[2] <= self._clock():
            self._jobs.pop(job_id, None)
            return None
        return hit[0], hit[1]

    async def status(self, job_id: str) -> str:
        entry = self._entry(job_id)
        if entry is None:
            raise BoardUnavailable(f"the job board has no status for job {job_id} yet")
        return entry[0]

    async def api_key(self, job_id: str) -> str | None:
        entry = self._entry(job_id)
        return entry[1] if entry else None
