"""The controller's side of the Batch API lane (docs/batch.md).

Calls a batch instructor's commands need (``CallsDeferred``) are stored, gathered into
batch jobs (at most ``batch_max_open`` open per instructor, each held against the budget
at its worst case before it is created), submitted through the files and batches API,
polled with backoff, and their output and error files stored as answers. A command whose
calls are all answered (or failed for good) is sent again with the answers attached.

Every step is written to the store before the next one is taken, so a process killed at
any moment, or another replica taking the job over, carries on from there:

- a submission is recorded (state ``submitting``, its calls assigned to it) before its
  input file is uploaded; the file id before the batch job is created; the batch id right
  after. A ``submitting`` submission found on a restart is looked up by its id in the
  batch jobs' metadata before it is created, so it is never created twice;
- a finished batch job's answers are stored with its final state in one transaction;
- a command is marked sent before it is published (lost in between, its task expires and
  is replaced; in one process, ``revive`` sends it again on the next run).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from airoboros.config import Config
from airoboros.contracts import (
    BatchAnswer,
    CallsDeferred,
    DeferredCall,
    GenerateBatch,
    Message,
    RespondToCandidates,
    new_id,
)
from airoboros.errors import LLMError
from airoboros.llm.batch import (
    BUDGET_ERROR,
    FINAL_STATES,
    BatchClient,
    answer_of,
    endpoint_for,
    parse_jsonl,
    worst_usage,
    write_jsonl,
)
from airoboros.store import BatchRepository, ProgressRepository, Submission

log = logging.getLogger(__name__)

#: the metadata key naming our submission id in a batch job (found again after a crash)
META_KEY = "airoboros_submission"
#: seconds between passes of the lane at most (see ``_next_wait``)
KEEP_ALIVE = 60.0


async def store_deferred(batches: BatchRepository, msg: CallsDeferred) -> bool:
    """Record a deferred command and its calls (idempotent: a redelivery writes nothing)."""
    return await batches.defer(
        msg.job_id,
        command_id=str(msg.command.get("message_id") or msg.message_id),
        task_id=msg.task_id,
        instructor=msg.instructor,
        command=msg.command,
        calls=[(c.key, c.body) for c in msg.calls],
    )


class BatchLane:
    """The batch jobs of one job, driven by its controller."""

    def __init__(
        self,
        job_id: str,
        config: Config,
        *,
        batches: BatchRepository,
        progress: ProgressRepository,
        publish: Callable[[Message], Awaitable[None]],
        client: BatchClient,
    ) -> None:
        self.job_id = job_id
        self.config = config
        self.batches = batches
        self.progress = progress
        self.publish = publish
        self.client = client
        self.endpoint = endpoint_for(config)
        #: per submission: (polls so far, when the next poll is due) - a pacing hint
        self._polls: dict[str, tuple[int, float]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._stopped = False
        #: ``summary()`` as of the last pass (what the progress table shows)
        self.last_summary: dict[str, dict[str, int]] = {}

    # --- the loop -------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    def kick(self) -> None:
        """Look at the lane now (new calls arrived)."""
        self._wake.set()

    async def stop(self, *, cancel_open: bool) -> None:
        """Stop polling (idempotent); with ``cancel_open``, cancel the open batch jobs."""
        if self._stopped:
            return
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            if cancel_open:
                await self.cancel_open()
        finally:
            await self.client.close()

    async def _run(self) -> None:
        interval = self.config.batch_poll_interval
        # Calls of tasks dispatched together arrive within moments: gather them first.
        gather = min(0.5, interval)
        while not self._stopped:
            try:
                await self.pump()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job %s: batch lane step failed; retrying", self.job_id)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._next_wait(interval))
            await asyncio.sleep(gather)

    def _next_wait(self, interval: float) -> float:
        # At least once a minute whatever the polls' backoff: each pass keeps the tasks
        # waiting for answers alive (the services expire tasks after ~16 minutes).
        if not self._polls:
            return min(interval, KEEP_ALIVE)
        due = min(t for _, t in self._polls.values()) - time.monotonic()
        return max(0.05, min(interval * 30, due, KEEP_ALIVE))

    async def on_deferred(self, msg: CallsDeferred) -> None:
        await store_deferred(self.batches, msg)
        self.kick()

    async def pump(self) -> None:
        """One pass: resend ready commands, submit what fits, poll what is due."""
        async with self._lock:
            await self.redispatch()
            unfinished = await self.batches.submissions(self.job_id, unfinished=True)
            for sub in unfinished:
                if sub.state == "submitting":
                    await self._create(sub, fresh=False)
            await self._submit_pending()
            await self._poll_due()
            await self.redispatch()
            waiting = await self.batches.waiting_tasks(self.job_id)
            await self.batches.keep_alive(self.job_id, waiting)
            self.last_summary = await self.summary()

    # --- submitting -----------------------------------------------------------------------
    async def _submit_pending(self) -> None:
        cfg = self.config
        for instructor in await self.batches.pending_instructors(self.job_id):
            while True:
                open_ = [
                    s
                    for s in await self.batches.submissions(self.job_id, unfinished=True)
                    if s.instructor == instructor
                ]
                if len(open_) >= cfg.batch_max_open:
                    break
                calls = await self.batches.pending(self.job_id, instructor, cfg.batch_max_requests)
                if not calls:
                    break
                deferred = [DeferredCall(key=c.key, body=c.body) for c in calls]
                fit, reserve = await self._fit_budget(deferred)
                if not fit:
                    if not await self._anything_open():
                        n = await self.batches.fail_pending(self.job_id, instructor, BUDGET_ERROR)
                        log.warning(
                            "job %s: %s: the budget cannot hold a batch; %d calls dropped",
                            self.job_id,
                            instructor,
                            n,
                        )
                    break
                sub = await self.batches.submit(
                    self.job_id, instructor, [c.key for c in fit], reserve[1], reserve[0]
                )
                await self._create(sub, fresh=True)

    async def _anything_open(self) -> bool:
        return bool(await self.batches.submissions(self.job_id, unfinished=True))

    async def _fit_budget(
        self, calls: list[DeferredCall]
    ) -> tuple[list[DeferredCall], tuple[int, float]]:
        """The calls (a prefix of ``calls``) whose batch the budget (``max_cost`` and
        ``max_tokens``) can hold at its worst case, with the tokens and cost it holds; all
        of them when there is no budget."""
        cfg = self.config
        if cfg.max_cost is None and cfg.max_tokens is None:
            return calls, worst_usage(calls, cfg)
        # Answers stored but not yet in the counters (their command still runs) are spent
        # too. Read first: a task completing in between is then counted twice, never
        # missed.
        spent_tokens, spent = await self.batches.unapplied_usage(self.job_id)
        stats = await self.progress.stats(self.job_id)
        spent += sum(s.cost for s in stats.values())
        spent_tokens += sum(s.tokens for s in stats.values())
        open_ = await self.batches.submissions(self.job_id, unfinished=True)
        room = math.inf if cfg.max_cost is None else cfg.max_cost - spent
        room -= sum(s.reserved_cost for s in open_)
        token_room = math.inf if cfg.max_tokens is None else cfg.max_tokens - spent_tokens
        token_room -= sum(s.reserved_tokens for s in open_)
        n = len(calls)
        while n > 0:
            tokens, worst = worst_usage(calls[:n], cfg)
            if worst <= room and tokens <= token_room:
                return calls[:n], (tokens, worst)
            n //= 2
        return [], (0, 0.0)

    async def _create(self, sub: Submission, *, fresh: bool) -> None:
        """Create the batch job of a ``submitting`` submission, exactly once. An error
        that trying again cannot mend (the endpoint has no Batch API, refuses the file or
        the key) fails the submission: its calls count an attempt and go back to pending,
        so they fail for good after ``batch_max_attempts`` instead of stalling the job."""
        try:
            await self._create_once(sub, fresh=fresh)
        except LLMError as exc:
            if exc.retryable:
                raise
            log.error("job %s: %s: batch job refused: %s", self.job_id, sub.instructor, exc)
            keys = [c.key for c in await self.batches.calls_of(sub.id)]
            await self.batches.apply(
                sub.id,
                "failed",
                {},
                max_attempts=self.config.batch_max_attempts,
                errors=dict.fromkeys(keys, f"batch job refused: {exc}"),
            )

    async def _create_once(self, sub: Submission, *, fresh: bool) -> None:
        if not fresh:
            found = await self.client.find(META_KEY, sub.id)
            if found is not None:
                log.info("job %s: found batch %s again (%s)", self.job_id, found.id, sub.id)
                await self.batches.update_submission(sub.id, batch_id=found.id, state="open")
                return
        file_id = sub.input_file_id
        if file_id is None:
            calls = await self.batches.calls_of(sub.id)
            data = write_jsonl((DeferredCall(key=c.key, body=c.body) for c in calls), self.endpoint)
            file_id = await self.client.upload(data, f"{sub.id}.jsonl")
            await self.batches.update_submission(sub.id, input_file_id=file_id)
        info = await self.client.create(
            file_id,
            self.endpoint,
            self.config.batch_completion_window,
            {
                META_KEY: sub.id,
                "airoboros_job": self.job_id[:512],
                "airoboros_instructor": sub.instructor[:512],
            },
        )
        await self.batches.update_submission(sub.id, batch_id=info.id, state="open")
        log.info("job %s: %s: batch %s submitted", self.job_id, sub.instructor, info.id)

    # --- polling ----------------------------------------------------------------------------
    async def _poll_due(self) -> None:
        now = time.monotonic()
        interval = self.config.batch_poll_interval
        for sub in await self.batches.submissions(self.job_id, unfinished=True):
            if sub.state != "open" or sub.batch_id is None:
                continue
            polls, due = self._polls.get(sub.id, (0, 0.0))
            if due > now:
                continue
            info = await self.client.retrieve(sub.batch_id)
            if info.status not in FINAL_STATES:
                delay = min(interval * 30, interval * 1.5**polls)
                self._polls[sub.id] = (polls + 1, time.monotonic() + delay)
                continue
            self._polls.pop(sub.id, None)
            await self._apply(sub, info.status, info.output_file_id, info.error_file_id)

    async def _apply(
        self, sub: Submission, status: str, output_id: str | None, error_id: str | None
    ) -> None:
        bodies = {c.key: c.body for c in await self.batches.calls_of(sub.id)}
        answers: dict[str, BatchAnswer] = {}
        errors: dict[str, str] = {}
        for file_id in (output_id, error_id):
            if not file_id:
                continue
            for line in parse_jsonl(await self.client.content(file_id)):
                if line.key not in bodies:
                    continue
                if line.text is None:
                    errors[line.key] = line.error or "failed"
                else:
                    model = str(bodies[line.key].get("model", self.config.model))
                    answers[line.key] = answer_of(line, self.config, model)
        await self.batches.update_submission(
            sub.id, output_file_id=output_id, error_file_id=error_id
        )
        answered, again = await self.batches.apply(
            sub.id,
            status,
            answers,
            max_attempts=self.config.batch_max_attempts,
            errors=errors,
        )
        log.info(
            "job %s: %s: batch %s %s: %d answered, %d to submit again",
            self.job_id,
            sub.instructor,
            sub.batch_id,
            status,
            answered,
            again,
        )

    # --- sending commands again -------------------------------------------------------------
    async def redispatch(self) -> int:
        sent = 0
        for ready in await self.batches.ready(self.job_id):
            if not await self.batches.dispatched(self.job_id, ready.command_id):
                continue
            raw: dict[str, Any] = dict(ready.command)
            kind = GenerateBatch if raw.get("kind") == "generate_batch" else RespondToCandidates
            command = kind.model_validate(raw)
            answers = {**command.answers, **ready.answers}
            again = command.model_copy(update={"message_id": new_id(), "answers": answers})
            await self.publish(again)
            sent += 1
        return sent

    # --- the end ----------------------------------------------------------------------------
    async def cancel_open(self) -> int:
        """Cancel every batch job of the job still open (one in creation is found first)."""
        cancelled = 0
        for sub in await self.batches.submissions(self.job_id, unfinished=True):
            batch_id = sub.batch_id
            if batch_id is None:
                found = await self.client.find(META_KEY, sub.id)
                batch_id = found.id if found is not None else None
            if batch_id is not None:
                try:
                    await self.client.cancel(batch_id)
                except Exception as exc:
                    log.warning("job %s: could not cancel batch %s: %s", self.job_id, batch_id, exc)
                    continue
            await self.batches.update_submission(sub.id, batch_id=batch_id, state="cancelled")
            cancelled += 1
        return cancelled

    async def summary(self) -> dict[str, dict[str, int]]:
        """Per instructor, its batch jobs: open, done (answers stored), failed (expired,
        failed, cancelled)."""
        out: dict[str, dict[str, int]] = {}
        for inst, states in (await self.batches.counts(self.job_id)).items():
            out[inst] = {
                "open": states.get("submitting", 0) + states.get("open", 0),
                "done": states.get("completed", 0),
                "failed": sum(states.get(s, 0) for s in ("expired", "failed", "cancelled")),
            }
        return out
