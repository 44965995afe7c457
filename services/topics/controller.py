"""The job controller: keeps a bounded number of batches in flight per instructor, sized to
what each category still needs, reserves room in the count before any response step is
paid for, applies finished batches (rows, counters, usage) in one transaction each, stops
every instructor at exactly its count, and ends the job.

The counting rules are airoboros.counting; their state is in the SQL store (counters,
streaks, tasks in flight with their reservations, the cancel flag), so a restarted
controller, or another topics replica holding the job's lease, carries on where the last
one stopped. The same class drives embedded runs and deployed services.
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
from typing import Any

from airoboros import telemetry
from airoboros.catalog import PHASES, spec
from airoboros.config import Config
from airoboros.contracts import (
    Artifact,
    BatchCompleted,
    CallsDeferred,
    CandidatesScreened,
    GenerateBatch,
    Item,
    JobEvent,
    JobSettings,
    Message,
    RespondToCandidates,
)
from airoboros.counting import FATAL_ERRORS, CategoryCounts, StopPolicy, job_outcome
from airoboros.store import (
    ArtifactRepository,
    Flight,
    JobRepository,
    ProgressRepository,
    RowRepository,
    StoredItem,
)
from airoboros.topics.batches import BatchLane
from airoboros.topics.inputs import batch_inputs
from airoboros.topics.topics import TopicPicker

log = logging.getLogger(__name__)


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
    #: why the instructor cannot progress (it is given up for this run), or None
    stalled: str | None
    phase: str = "main"
    #: why the instructor has nothing to do (editor without writing rows); not a failure
    skipped: str | None = None
    refused: int = 0
    unparseable: int = 0
    truncated: int = 0
    retries: int = 0
    tokens: int = 0
    cost: float = 0.0
    wasted_tokens: float = 0.0
    #: (batch lane) its batch jobs: open, done (answers stored), failed; None: online
    batches: dict[str, int] | None = None

    @property
    def done(self) -> bool:
        return self.accepted >= self.target or self.stalled is not None or bool(self.skipped)


class StoreSources:
    """``Sources`` over the job's store: what later phases work from."""

    def __init__(
        self,
        job_id: str,
        *,
        rows: RowRepository,
        artifacts: ArtifactRepository,
        progress: ProgressRepository,
    ) -> None:
        self.job_id = job_id
        self._rows = rows
        self._artifacts = artifacts
        self._progress = progress

    async def rows(
        self, categories: list[str], n: int, *, unused_by: str | None = None
    ) -> list[Item]:
        found = await self._rows.sample(self.job_id, categories, n, unused_by=unused_by)
        return [s.item for s in found]

    async def cards(self) -> list[Artifact]:
        return await self._artifacts.of_kind(self.job_id, "character")

    async def advance_cursor(self, instructor: str, n: int) -> int:
        return await self._progress.advance_cursor(self.job_id, instructor, n)


@dataclass
class JobOutcome:
    status: str  # done | incomplete | budget_exhausted | failed | cancelled
    detail: str | None = None


def stop_policy(config: Config) -> StopPolicy:
    return StopPolicy(
        max_failed_batches=config.max_failed_batches,
        max_duplicate_batches=config.max_duplicate_batches,
    )


async def grant_and_forward(
    progress: ProgressRepository,
    publish: Callable[[Message], Awaitable[None]],
    msg: CandidatesScreened,
) -> BatchCompleted | None:
    """Reserve room in the count for a screened batch and send the candidates that fit
    to their response step. Returns the batch's completion instead when none fit (nothing
    is left to pay for), for the caller to apply."""
    rows = await progress.grant(
        msg.job_id, msg.task_id, msg.instructor, [c.counts for c in msg.accepted]
    )
    # A candidate granted fewer rows than it could make is told so (``counts``).
    granted = [
        c.model_copy(update={"counts": n}) for c, n in zip(msg.accepted, rows, strict=True) if n
    ]
    withheld = [c for c, n in zip(msg.accepted, rows, strict=True) if not n]
    stats = msg.stats.model_copy(
        update={
            "withheld": msg.stats.withheld + len(withheld),
            "lost_tokens": msg.stats.lost_tokens + sum(c.cost_tokens for c in withheld),
        }
    )
    if not granted:
        return BatchCompleted(
            job_id=msg.job_id,
            task_id=msg.task_id,
            instructor=msg.instructor,
            stats=stats,
            headers=msg.headers,
        )
    await publish(
        RespondToCandidates(
            job_id=msg.job_id,
            task_id=msg.task_id,
            instructor=msg.instructor,
            candidates=granted,
            stats=stats,
            settings=msg.settings,
            headers=msg.headers,
        )
    )
    return None


class JobController:
    def __init__(
        self,
        job_id: str,
        config: Config,
        publish: Callable[[Message], Awaitable[None]],
        *,
        jobs: JobRepository,
        progress: ProgressRepository,
        rows: RowRepository,
        artifacts: ArtifactRepository,
        active: list[str],
        pickers: dict[str, TopicPicker | None],
        on_rows: Callable[[list[StoredItem]], None] | None = None,
        on_finish: Callable[[JobOutcome], Awaitable[None]] | None = None,
        task_timeout: float | None = None,
        seed: int | None = None,
        on_artifacts: Callable[[list[Artifact]], Awaitable[None]] | None = None,
        trace_context: dict[str, str] | None = None,
    ) -> None:
        self.job_id = job_id
        #: the job's trace (the request that created it): its batches are dispatched in it
        self.trace_context = trace_context or None
        self.config = config
        self.policy = stop_policy(config)
        self.jobs = jobs
        self.progress = progress
        self.rows = rows
        self.artifacts = artifacts
        self.publish = publish
        self.active = active
        self.pickers = pickers
        self.on_rows = on_rows
        self.on_finish = on_finish
        self.task_timeout = task_timeout or (config.request_timeout + config.max_retry_time + 60.0)
        self.sources = StoreSources(job_id, rows=rows, artifacts=artifacts, progress=progress)
        self.on_artifacts = on_artifacts
        self._rng = random.Random(seed)
        self._background: set[asyncio.Task[None]] = set()
        self._finished = asyncio.Event()
        self.outcome: JobOutcome | None = None
        self._lock = asyncio.Lock()
        self._stats: dict[str, CategoryCounts] = {}
        #: the job's config as each instructor's commands carry it (see settings_for)
        self._configs: dict[str, dict[str, Any]] = {}
        self._flights: dict[str, Flight] = {}
        #: when each category's last batch completed: a category whose replies keep
        #: failing sends its next probe a pause after that (a pacing hint, not job state:
        #: after a restart it probes at once, which is harmless)
        self._last_done: dict[str, float] = {}
        self.started = time.monotonic()
        #: (batch lane) the job's batch jobs, when an instructor's calls go through the
        #: Batch API (set by airoboros.topics.lifecycle.open_job)
        self.lane: BatchLane | None = None

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    # --- results ------------------------------------------------------------------------
    async def on_screened(self, msg: CandidatesScreened) -> None:
        """Reserve room in the count for a screened batch; pass on what fits."""
        done = await grant_and_forward(self.progress, self.publish, msg)
        if done is not None:
            await self.on_completed(done)

    async def on_completed(self, msg: BatchCompleted) -> None:
        """Apply a finished batch (idempotent by message id), then top up or finish."""
        stored = await self.rows.apply_batch(
            self.job_id,
            message_id=msg.message_id,
            task_id=msg.task_id,
            instructor=msg.instructor,
            items=msg.items,
            stats=msg.stats,
            artifacts=msg.artifacts,
            error=msg.error,
            error_message=msg.error_message,
        )
        if stored is not None and msg.artifacts and self.on_artifacts is not None:
            try:
                # Every artifact the job has, so a hook that failed once catches up.
                await self.on_artifacts(await self.artifacts.of_kind(self.job_id, "character"))
            except Exception:
                log.exception("job %s: could not save artifacts", self.job_id)
        async with self._lock:
            self._last_done[msg.instructor] = time.monotonic()
            if stored is not None and self.on_rows is not None and stored:
                self.on_rows(stored)
            if msg.error in FATAL_ERRORS:
                await self._finish(JobOutcome("failed", f"{msg.instructor}: {msg.error_message}"))
                return
            if msg.error and msg.error_message:
                log.info(
                    "job %s: %s batch failed: %s", self.job_id, msg.instructor, msg.error_message
                )
        await self.tick()

    async def on_deferred(self, msg: CallsDeferred) -> None:
        """(batch lane) Calls a command needs answered: stored, sent as a batch job."""
        if self.lane is not None:
            await self.lane.on_deferred(msg)
        else:
            log.warning("job %s: calls deferred, but no instructor is in batch mode", self.job_id)

    # --- the control loop ---------------------------------------------------------------
    async def tick(self) -> None:
        """Re-read the job's state and act on it: finish, or dispatch what is missing."""
        async with self._lock:
            if self._finished.is_set():
                return
            job = await self.jobs.get(self.job_id)
            if job.status != "running":
                # Another controller ended it (or it was ended before a restart).
                self.outcome = JobOutcome(job.status, job.detail)
                self._finished.set()
                return
            if math.isfinite(self.task_timeout):
                await self.progress.expire_tasks(
                    self.job_id, datetime.now(UTC) - timedelta(seconds=self.task_timeout)
                )
            self._stats = await self.progress.stats(self.job_id)
            self._flights = await self.progress.flights(self.job_id)
            in_flight_total = sum(self._flight(n).batches for n in self.active)
            if job.cancel_requested:
                await self._finish(JobOutcome("cancelled", job.detail or "cancelled by request"))
                return
            # The store keeps a budget stop a batch met (job.budget_note); the totals tell
            # one that no call has met yet.
            budget = job.budget_note or self._budget_from_totals()
            if budget:
                if in_flight_total == 0:
                    await self._finish(JobOutcome("budget_exhausted", budget))
                return
            ended = job_outcome([self._counts(n) for n in self.active], self.policy)
            if ended is not None:
                await self._finish(JobOutcome(*ended))
                return
            # Phases run in order: only the first phase with work left is dispatched.
            current = self.current_phase(self.snapshot())
            skipped = False
            for name in self.active:
                c = self._counts(name)
                if self.phase_of(name) == current and not c.settled(self.policy):
                    skipped |= await self._dispatch(name, c)
            if skipped:
                # An instructor with nothing to do ends its phase (or the job) now: no
                # batch will complete to trigger the next look.
                self._schedule_tick(0.0)

    def _counts(self, name: str) -> CategoryCounts:
        return self._stats.get(name) or CategoryCounts(name)

    def _flight(self, name: str) -> Flight:
        return self._flights.get(name) or Flight()

    def _schedule_tick(self, delay: float) -> None:
        async def later() -> None:
            await asyncio.sleep(delay)
            await self.tick()

        task = asyncio.create_task(later())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    def phase_of(name: str) -> str:
        return spec(name).phase

    @staticmethod
    def current_phase(views: list[InstructorView]) -> str | None:
        for phase in PHASES:
            if any(not v.done for v in views if v.phase == phase):
                return phase
        return None

    def settings_for(self, name: str) -> JobSettings:
        """What a worker needs to run ``name`` for this job (it has no database)."""
        if name not in self._configs:
            dumped = self.config.model_dump(mode="json", exclude={"openai_api_key"})
            dumped["instructors"] = {name: dumped["instructors"][name]}
            self._configs[name] = dumped
        return JobSettings(
            config=self._configs[name],
            spent_tokens=sum(s.tokens for s in self._stats.values()),
            spent_cost=sum(s.cost for s in self._stats.values()),
        )

    def _budget_from_totals(self) -> str | None:
        tokens = sum(s.prompt_tokens + s.completion_tokens for s in self._stats.values())
        cost = sum(s.cost for s in self._stats.values())
        cfg = self.config
        if cfg.max_tokens is not None and tokens >= cfg.max_tokens:
            return f"token budget of {cfg.max_tokens} reached ({tokens} used)"
        if cfg.max_cost is not None and cost >= cfg.max_cost:
            return f"cost budget of ${cfg.max_cost:.2f} reached (${cost:.4f} spent)"
        return None

    async def _dispatch(self, name: str, c: CategoryCounts) -> bool:
        """Send the batches ``name`` needs now; True when it turned out to have nothing
        to work from (skipped)."""
        batch_size = self.config.batch_size_for(name)
        flight = self._flight(name)
        # Enough batches to keep the call budget busy; one at a time while whole replies
        # keep failing, after a pause that grows with the failures.
        slots = max(1, math.ceil(self.config.max_concurrency / max(1, batch_size)))
        if c.probing(self.policy):
            wait = self._last_done.get(name, 0.0) + c.backoff(self.policy) - time.monotonic()
            if wait > 0:
                if flight.batches == 0:
                    self._schedule_tick(wait)
                return False
            slots = 1
        picker = self.pickers.get(name)
        needs = spec(name).needs
        sizes = c.plan(
            batch_size,
            slots=slots - flight.batches,
            pending_items=flight.pending_items,
            policy=self.policy,
            rows_per_item=spec(name).rows_per_item,
        )
        for size in sizes:
            inputs = await batch_inputs(
                self.config, name, self.sources, size, self._rng, job_id=self.job_id
            )
            if inputs is None:
                if flight.batches == 0:
                    reason = f"it needs {needs}, and there are none"
                    await self.progress.set_skipped(self.job_id, name, reason)
                    log.warning("job %s: %s skipped: no %s", self.job_id, name, needs)
                    return True
                return False
            task = GenerateBatch(
                job_id=self.job_id,
                instructor=name,
                batch_size=size,
                topics=picker.take(size) if picker else [],
                remaining=c.room,
                inputs=inputs,
                settings=self.settings_for(name),
            )
            # Recorded before it is published: a crash in between leaves a task that
            # expires, never a batch the controller does not know about.
            await self.progress.add_task(self.job_id, task.task_id, name, asked=size)
            with telemetry.span(
                f"dispatch {name}",
                parent=self.trace_context,
                attributes={
                    "airoboros.service": "topics",
                    "airoboros.job_id": self.job_id,
                    "airoboros.instructor": name,
                    "airoboros.task_id": task.task_id,
                },
            ):
                await self.publish(task)
            flight.batches += 1
            flight.unscreened += 1
            flight.pending_items += size
            self._flights[name] = flight
        return False

    async def start(self) -> None:
        await self.publish(JobEvent(job_id=self.job_id, status="running"))
        if self.lane is not None:
            self.lane.start()
        await self.tick()

    async def _finish(self, outcome: JobOutcome) -> None:
        if self._finished.is_set():
            return
        if self.lane is not None:
            # Batch jobs still open buy nothing now (cancel, or a count reached).
            try:
                await self.lane.stop(cancel_open=True)
            except Exception:
                log.exception("job %s: could not cancel its open batch jobs", self.job_id)
        if self.on_finish is not None:
            # Before the status: a job reads "done" only once its export exists.
            try:
                await self.on_finish(outcome)
            except Exception as exc:
                log.exception("job %s: finishing step failed", self.job_id)
                outcome = JobOutcome("failed", f"{outcome.status}, but finishing failed: {exc}")
        self.outcome = outcome
        await self.jobs.set_status(self.job_id, outcome.status, outcome.detail)
        if outcome.status == "incomplete":
            log.warning("job %s incomplete: %s", self.job_id, outcome.detail)
        await self.publish(
            JobEvent(job_id=self.job_id, status=outcome.status, detail=outcome.detail)
        )
        self._finished.set()

    async def cancel(self, reason: str = "cancelled") -> None:
        await self.jobs.request_cancel(self.job_id)
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
            st = self._counts(name)
            views.append(
                InstructorView(
                    name,
                    st.target,
                    st.accepted,
                    st.duplicates,
                    st.filtered,
                    st.failures,
                    self._flight(name).batches,
                    st.stop_reason(self.policy),
                    self.phase_of(name),
                    st.skipped,
                    refused=st.refused,
                    unparseable=st.unparseable,
                    truncated=st.truncated,
                    retries=st.retries,
                    tokens=st.tokens,
                    cost=st.cost,
                    wasted_tokens=st.wasted_tokens,
                    batches=self.lane.last_summary.get(name) if self.lane else None,
                )
            )
        return views

    def requests_per_minute(self) -> float:
        elapsed = max(1e-6, time.monotonic() - self.started)
        return sum(s.requests for s in self._stats.values()) * 60.0 / elapsed
