"""The job controller: keeps a bounded number of batches in flight per instructor, applies
finished batches (rows, counters, usage) in one transaction each, stops every instructor
at exactly its count, and ends the job.

All of its state is in the SQL store (tasks in flight, counters, the cancel flag), so a
restarted controller, or another topics replica holding the job's lease, carries on where
the last one stopped. The same class drives embedded runs and deployed services.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from airoboros import telemetry
from airoboros.config import Config
from airoboros.contracts import Artifact, BatchCompleted, GenerateBatch, Item, JobEvent, Message
from airoboros.store import InstructorStats, SqlStore, StoredItem
from airoboros.topics.topics import TopicPicker

if TYPE_CHECKING:
    from airoboros.generator.instructors.base import Instructor

log = logging.getLogger(__name__)

#: Errors after which no call of the job can succeed (a single bad request can be the
#: prompt's fault, so it only counts as a failure).
FATAL_ERRORS = {"auth_error", "model_not_found"}
#: Consecutive batches without a single new row before an instructor is given up.
MAX_BARREN_BATCHES = 25


@dataclass
class InstructorView:
    """What the progress display shows for one instructor."""

    name: str
    target: int
    accepted: int
    duplicates: int
    filtered: int
    failures: int
    in_flight: int
    stalled: str | None
    phase: str = "main"
    #: why the instructor has nothing to do (editor without writing rows); not a failure
    skipped: str | None = None

    @property
    def done(self) -> bool:
        return self.accepted >= self.target or self.stalled is not None or bool(self.skipped)


class StoreSources:
    """``Sources`` over the job's store: what later phases work from."""

    def __init__(self, store: SqlStore, job_id: str) -> None:
        self.store = store
        self.job_id = job_id

    async def rows(
        self, categories: list[str], n: int, *, unused_by: str | None = None
    ) -> list[Item]:
        found = await self.store.sample_items(self.job_id, categories, n, unused_by=unused_by)
        return [s.item for s in found]

    async def cards(self) -> list[Artifact]:
        return await self.store.artifacts(self.job_id, "character")


@dataclass
class JobOutcome:
    status: str  # done | budget_exhausted | failed | cancelled
    detail: str | None = None


def expected_yield(st: InstructorStats, batch_size: int) -> float:
    if st.batches == 0:
        return float(batch_size)
    return max(0.5, st.rows_from_batches / st.batches)


class JobController:
    def __init__(
        self,
        job_id: str,
        config: Config,
        store: SqlStore,
        publish: Callable[[Message], Awaitable[None]],
        *,
        active: list[str],
        pickers: dict[str, TopicPicker | None],
        on_rows: Callable[[list[StoredItem]], None] | None = None,
        on_finish: Callable[[JobOutcome], Awaitable[None]] | None = None,
        task_timeout: float | None = None,
        classes: dict[str, type[Instructor]] | None = None,
        seed: int | None = None,
        on_artifacts: Callable[[list[Artifact]], Awaitable[None]] | None = None,
        trace_context: dict[str, str] | None = None,
    ) -> None:
        self.job_id = job_id
        #: the job's trace (the request that created it): its batches are dispatched in it
        self.trace_context = trace_context or None
        self.config = config
        self.store = store
        self.publish = publish
        self.active = active
        self.pickers = pickers
        self.on_rows = on_rows
        self.on_finish = on_finish
        self.task_timeout = task_timeout or (config.request_timeout + config.max_retry_time + 60.0)
        if classes is None:
            from airoboros.generator.registry import implemented_instructors

            impl = implemented_instructors()
            classes = {n: impl[n] for n in active if n in impl}
        self.classes = classes
        self.sources = StoreSources(store, job_id)
        self.on_artifacts = on_artifacts
        self._rng = random.Random(seed)
        self._skipped: dict[str, str] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._finished = asyncio.Event()
        self.outcome: JobOutcome | None = None
        self._budget_hit: str | None = None
        self._last_error: dict[str, str] = {}
        self._lock = asyncio.Lock()
        self._stats: dict[str, InstructorStats] = {}
        self._in_flight: dict[str, int] = {}
        self.started = time.monotonic()
        #: tokens paid by batches, and the part of them that produced no stored row
        self.batch_tokens = 0
        self.wasted_tokens = 0.0

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    # --- results ------------------------------------------------------------------------
    async def on_completed(self, msg: BatchCompleted) -> None:
        """Apply a finished batch (idempotent by message id), then top up or finish."""
        stored = await self.store.apply_batch(
            self.job_id,
            message_id=msg.message_id,
            task_id=msg.task_id,
            instructor=msg.instructor,
            items=msg.items,
            stats=msg.stats,
            artifacts=msg.artifacts,
        )
        if stored is not None and msg.artifacts and self.on_artifacts is not None:
            try:
                # Every artifact the job has, so a hook that failed once catches up.
                await self.on_artifacts(await self.store.artifacts(self.job_id, "character"))
            except Exception:
                log.exception("job %s: could not save artifacts", self.job_id)
        async with self._lock:
            if stored is not None:
                if self.on_rows is not None and stored:
                    self.on_rows(stored)
                # Each candidate lost (duplicate, filtered, failed) or row dropped past the
                # count is an equal share of the batch's tokens that bought nothing.
                units = max(
                    1,
                    len(msg.items) + msg.stats.duplicates + msg.stats.filtered + msg.stats.failures,
                )
                self.batch_tokens += msg.stats.tokens
                self.wasted_tokens += msg.stats.tokens * (1 - len(stored) / units)
            if msg.error == "budget_exhausted":
                self._budget_hit = msg.error_message or "budget exhausted"
            elif msg.error in FATAL_ERRORS:
                await self._finish(JobOutcome("failed", f"{msg.instructor}: {msg.error_message}"))
                return
            elif msg.error and msg.error_message:
                self._last_error[msg.instructor] = msg.error_message
        await self.tick()

    # --- the control loop ---------------------------------------------------------------
    async def tick(self) -> None:
        """Re-read the job's state and act on it: finish, or dispatch what is missing."""
        async with self._lock:
            if self._finished.is_set():
                return
            job = await self.store.get_job(self.job_id)
            if job.status != "running":
                # Another controller ended it (or it was ended before a restart).
                self.outcome = JobOutcome(job.status, job.detail)
                self._finished.set()
                return
            if math.isfinite(self.task_timeout):
                await self.store.expire_tasks(
                    self.job_id, datetime.now(UTC) - timedelta(seconds=self.task_timeout)
                )
            self._stats = await self.store.stats(self.job_id)
            self._in_flight = await self.store.in_flight(self.job_id)
            in_flight_total = sum(self._in_flight.get(n, 0) for n in self.active)
            if job.cancel_requested:
                await self._finish(JobOutcome("cancelled", job.detail or "cancelled by request"))
                return
            budget = self._budget_hit or self._budget_from_totals()
            if budget:
                self._budget_hit = budget
                if in_flight_total == 0:
                    await self._finish(JobOutcome("budget_exhausted", budget))
                return
            views = self.snapshot()
            if all(v.done for v in views):
                stalled = [f"{v.name}: {v.stalled}" for v in views if v.stalled]
                skipped = [f"{v.name} skipped: {v.skipped}" for v in views if v.skipped]
                if stalled:
                    await self._finish(JobOutcome("failed", "; ".join(stalled + skipped)))
                else:
                    await self._finish(JobOutcome("done", "; ".join(skipped) or None))
                return
            # Phases run in order: only the first phase with work left is dispatched.
            current = self.current_phase(views)
            skipped_before = len(self._skipped)
            for v in views:
                if not v.done and v.phase == current:
                    await self._dispatch(v)
            if len(self._skipped) > skipped_before:
                # An instructor with nothing to do ends its phase (or the job) now: no
                # batch will complete to trigger the next look.
                retick = asyncio.create_task(self.tick())
                self._background.add(retick)
                retick.add_done_callback(self._background.discard)

    def phase_of(self, name: str) -> str:
        cls = self.classes.get(name)
        return cls.phase if cls is not None else "main"

    @staticmethod
    def current_phase(views: list[InstructorView]) -> str | None:
        from airoboros.generator.instructors.base import PHASES

        for phase in PHASES:
            if any(not v.done for v in views if v.phase == phase):
                return phase
        return None

    def _budget_from_totals(self) -> str | None:
        tokens = sum(s.prompt_tokens + s.completion_tokens for s in self._stats.values())
        cost = sum(s.cost for s in self._stats.values())
        cfg = self.config
        if cfg.max_tokens is not None and tokens >= cfg.max_tokens:
            return f"token budget of {cfg.max_tokens} reached ({tokens} used)"
        if cfg.max_cost is not None and cost >= cfg.max_cost:
            return f"cost budget of ${cfg.max_cost:.2f} reached (${cost:.4f} spent)"
        return None

    def _cap(self, name: str, st: InstructorStats) -> int:
        # Enough batches to keep the call budget busy, and no more than the rows still
        # needed (so little is paid for past the count).
        batch_size = self.config.batch_size_for(name)
        by_calls = max(1, math.ceil(self.config.max_concurrency / max(1, batch_size)))
        need = max(0, st.target - st.accepted)
        by_need = max(1, math.ceil(need / expected_yield(st, batch_size)))
        return min(by_calls, by_need)

    async def _dispatch(self, v: InstructorView) -> None:
        st = self._stats[v.name]
        batch_size = self.config.batch_size_for(v.name)
        picker = self.pickers.get(v.name)
        missing = self._cap(v.name, st) - v.in_flight
        cls = self.classes.get(v.name)
        for _ in range(max(0, missing)):
            inputs: list[dict[str, Any]] | None = []
            if cls is not None:
                inputs = await cls.batch_inputs(
                    self.config, v.name, self.sources, batch_size, self._rng
                )
            if inputs is None:
                if v.in_flight == 0 and cls is not None:
                    self._skipped[v.name] = f"it needs {cls.needs}, and there are none"
                    log.warning("job %s: %s skipped: no %s", self.job_id, v.name, cls.needs)
                return
            task = GenerateBatch(
                job_id=self.job_id,
                instructor=v.name,
                batch_size=batch_size,
                topics=picker.take(batch_size) if picker else [],
                remaining=st.target - st.accepted,
                inputs=inputs,
            )
            # Recorded before it is published: a crash in between leaves a task that
            # expires, never a batch the controller does not know about.
            await self.store.add_task(self.job_id, task.task_id, v.name)
            with telemetry.span(
                f"dispatch {v.name}",
                parent=self.trace_context,
                attributes={
                    "airoboros.service": "topics",
                    "airoboros.job_id": self.job_id,
                    "airoboros.instructor": v.name,
                    "airoboros.task_id": task.task_id,
                },
            ):
                await self.publish(task)
            self._in_flight[v.name] = self._in_flight.get(v.name, 0) + 1

    async def start(self) -> None:
        await self.publish(JobEvent(job_id=self.job_id, status="running"))
        await self.tick()

    async def _finish(self, outcome: JobOutcome) -> None:
        if self._finished.is_set():
            return
        if self.on_finish is not None:
            # Before the status: a job reads "done" only once its export exists.
            try:
                await self.on_finish(outcome)
            except Exception as exc:
                log.exception("job %s: finishing step failed", self.job_id)
                outcome = JobOutcome("failed", f"{outcome.status}, but finishing failed: {exc}")
        self.outcome = outcome
        await self.store.set_job_status(self.job_id, outcome.status, outcome.detail)
        await self.publish(
            JobEvent(job_id=self.job_id, status=outcome.status, detail=outcome.detail)
        )
        self._finished.set()

    async def cancel(self, reason: str = "cancelled") -> None:
        await self.store.request_cancel(self.job_id)
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
    def snapshot(self) -> list[InstructorView]:
        views = []
        for name in self.active:
            st = self._stats.get(name) or InstructorStats(name)
            stalled = None
            if st.barren >= MAX_BARREN_BATCHES and st.accepted < st.target:
                stalled = f"no new rows in {st.barren} batches in a row"
                if name in self._last_error:
                    stalled += f" (last error: {self._last_error[name]})"
            views.append(
                InstructorView(
                    name,
                    st.target,
                    st.accepted,
                    st.duplicates,
                    st.filtered,
                    st.failures,
                    self._in_flight.get(name, 0),
                    stalled,
                    self.phase_of(name),
                    self._skipped.get(name),
                )
            )
        return views

    def requests_per_minute(self) -> float:
        elapsed = max(1e-6, time.monotonic() - self.started)
        return sum(s.requests for s in self._stats.values()) * 60.0 / elapsed
