"""The job controller: keeps a bounded number of batches in flight per instructor, stores
rows as they arrive, stops each instructor at exactly its count, and ends the job."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from airoboros.config import Config
from airoboros.contracts import BatchCompleted, GenerateBatch, JobEvent, Message
from airoboros.llm import UsageMeter
from airoboros.store import SqlStore
from airoboros.topics.sink import JsonlSink
from airoboros.topics.topics import TopicPicker

log = logging.getLogger(__name__)

#: Errors after which no call of the job can succeed (a single bad request can be the
#: prompt's fault, so it only counts as a failure).
FATAL_ERRORS = {"auth_error", "model_not_found"}
#: Consecutive batches without a single new row before an instructor is given up.
MAX_BARREN_BATCHES = 25


@dataclass
class InstructorState:
    name: str
    target: int
    batch_size: int
    picker: TopicPicker | None
    accepted: int = 0
    duplicates: int = 0
    filtered: int = 0
    failures: int = 0
    dropped: int = 0
    batches: int = 0
    rows_from_batches: int = 0
    barren: int = 0
    in_flight: set[str] = field(default_factory=set)
    stalled: str | None = None
    last_error: str | None = None

    @property
    def done(self) -> bool:
        return self.accepted >= self.target or self.stalled is not None

    def expected_yield(self) -> float:
        if self.batches == 0:
            return float(self.batch_size)
        return max(0.5, self.rows_from_batches / self.batches)


class UsageLedger:
    """Writes the meter's per-instructor usage to the store as deltas, so tokens and cost
    survive a restart and budgets span reruns."""

    def __init__(self, store: SqlStore, job_id: str, meter: UsageMeter) -> None:
        self.store = store
        self.job_id = job_id
        self.meter = meter
        self._persisted: dict[str, tuple[int, int, int, float]] = {}

    async def flush(self, names: list[str] | None = None) -> None:
        for name in names if names is not None else list(self.meter.by_instructor):
            u = self.meter.by_instructor.get(name)
            if u is None:
                continue
            cur = (u.requests, u.prompt_tokens, u.completion_tokens, u.cost)
            prev = self._persisted.get(name, (0, 0, 0, 0.0))
            if cur == prev:
                continue
            self._persisted[name] = cur
            await self.store.add_stats(
                self.job_id,
                name,
                requests=cur[0] - prev[0],
                prompt_tokens=cur[1] - prev[1],
                completion_tokens=cur[2] - prev[2],
                cost=cur[3] - prev[3],
            )

    def mark_loaded(self) -> None:
        """The meter was preloaded from the store: that much is already persisted."""
        for name, u in self.meter.by_instructor.items():
            self._persisted[name] = (u.requests, u.prompt_tokens, u.completion_tokens, u.cost)


@dataclass
class JobOutcome:
    status: str  # done | budget_exhausted | failed | cancelled
    detail: str | None = None


class JobController:
    def __init__(
        self,
        job_id: str,
        config: Config,
        store: SqlStore,
        publish: Callable[[Message], Awaitable[None]],
        states: dict[str, InstructorState],
        sink: JsonlSink | None,
        meter: UsageMeter,
        ledger: UsageLedger,
        *,
        max_in_flight_calls: int | None = None,
        uses_topics: dict[str, bool] | None = None,
    ) -> None:
        self.job_id = job_id
        self.config = config
        self.store = store
        self.publish = publish
        self.states = states
        self.sink = sink
        self.meter = meter
        self.ledger = ledger
        self.max_calls = max_in_flight_calls or config.max_concurrency
        self.uses_topics = uses_topics or {}
        self._finished = asyncio.Event()
        self.outcome: JobOutcome | None = None
        self._budget_hit: str | None = None
        self._seen_tasks: set[str] = set()
        self._lock = asyncio.Lock()
        self.started = time.monotonic()
        #: tokens paid by batches, and the part of them that produced no stored row
        self.batch_tokens = 0
        self.wasted_tokens = 0.0

    # --- dispatch -----------------------------------------------------------------------
    def _cap(self, st: InstructorState) -> int:
        # Enough batches to keep the call budget busy, and no more than the rows still
        # needed (so little is paid for past the count).
        by_calls = max(1, math.ceil(self.max_calls / max(1, st.batch_size)))
        by_need = max(1, math.ceil((st.target - st.accepted) / st.expected_yield()))
        return min(by_calls, by_need)

    async def _dispatch(self, st: InstructorState) -> None:
        while (
            not self._finished.is_set()
            and self._budget_hit is None
            and not st.done
            and len(st.in_flight) < self._cap(st)
        ):
            topics = st.picker.take(st.batch_size) if st.picker else []
            task = GenerateBatch(
                job_id=self.job_id,
                instructor=st.name,
                batch_size=st.batch_size,
                topics=topics,
                remaining=st.target - st.accepted,
            )
            st.in_flight.add(task.task_id)
            await self.publish(task)

    async def start(self) -> None:
        await self.publish(JobEvent(job_id=self.job_id, status="running"))
        for st in self.states.values():
            await self._dispatch(st)
        await self._maybe_finish()

    # --- results ------------------------------------------------------------------------
    async def on_completed(self, msg: BatchCompleted) -> None:
        async with self._lock:
            await self._on_completed(msg)

    async def _on_completed(self, msg: BatchCompleted) -> None:
        st = self.states.get(msg.instructor)
        if st is None or self._finished.is_set():
            return
        first_delivery = msg.task_id not in self._seen_tasks
        self._seen_tasks.add(msg.task_id)
        stored = await self.store.add_items(
            self.job_id, [(f"{msg.task_id}:{i}", it) for i, it in enumerate(msg.items)]
        )
        if self.sink is not None:
            self.sink.write(stored)
        if first_delivery:
            st.in_flight.discard(msg.task_id)
            st.batches += 1
            st.rows_from_batches += len(msg.items)
            st.accepted += len(stored)
            st.dropped += len(msg.items) - len(stored)
            st.duplicates += msg.stats.duplicates
            st.filtered += msg.stats.filtered
            st.failures += msg.stats.failures
            st.barren = 0 if stored else st.barren + 1
            # Each candidate lost (duplicate, filtered, failed) or row dropped past the
            # count is an equal share of the batch's tokens that bought nothing.
            units = max(
                1, len(msg.items) + msg.stats.duplicates + msg.stats.filtered + msg.stats.failures
            )
            self.batch_tokens += msg.stats.tokens
            self.wasted_tokens += msg.stats.tokens * (1 - len(stored) / units)
            await self._persist_stats(st.name, msg)
        if msg.error == "budget_exhausted":
            self._budget_hit = msg.error_message or "budget exhausted"
        elif msg.error in FATAL_ERRORS:
            await self._finish(JobOutcome("failed", f"{msg.instructor}: {msg.error_message}"))
            return
        elif msg.error:
            st.last_error = msg.error_message
        if self.meter.exhausted and self._budget_hit is None:
            self._budget_hit = self.meter.exhausted
        if st.barren >= MAX_BARREN_BATCHES and not st.done:
            st.stalled = f"no new rows in {st.barren} batches in a row" + (
                f" (last error: {st.last_error})" if st.last_error else ""
            )
            log.warning("%s: giving up: %s", st.name, st.stalled)
        await self._dispatch(st)
        await self._maybe_finish()

    async def _persist_stats(self, name: str, msg: BatchCompleted) -> None:
        await self.store.add_stats(
            self.job_id,
            name,
            duplicates=msg.stats.duplicates,
            filtered=msg.stats.filtered,
            failures=msg.stats.failures,
        )
        await self.ledger.flush([name])

    async def _maybe_finish(self) -> None:
        if self._finished.is_set():
            return
        if self._budget_hit is not None:
            if all(not st.in_flight for st in self.states.values()):
                await self._finish(JobOutcome("budget_exhausted", self._budget_hit))
            return
        if all(st.done for st in self.states.values()):
            stalled = {n: s.stalled for n, s in self.states.items() if s.stalled}
            if stalled:
                detail = "; ".join(f"{n}: {r}" for n, r in stalled.items())
                await self._finish(JobOutcome("failed", detail))
            else:
                await self._finish(JobOutcome("done"))

    async def _finish(self, outcome: JobOutcome) -> None:
        if self._finished.is_set():
            return
        self.outcome = outcome
        # Usage of calls whose batches never completed (cancelled at the end) still counts.
        await self.ledger.flush()
        await self.store.set_job_status(self.job_id, outcome.status, outcome.detail)
        self._finished.set()

    async def cancel(self, reason: str = "cancelled") -> None:
        async with self._lock:
            await self._finish(JobOutcome("cancelled", reason))

    async def fail(self, reason: str) -> None:
        async with self._lock:
            await self._finish(JobOutcome("failed", reason))

    async def wait(self) -> JobOutcome:
        await self._finished.wait()
        assert self.outcome is not None
        return self.outcome

    # --- progress -----------------------------------------------------------------------
    def snapshot(self) -> list[InstructorState]:
        return list(self.states.values())

    def requests_per_minute(self) -> float:
        elapsed = max(1e-6, time.monotonic() - self.started)
        return self.meter.total.requests * 60.0 / elapsed
