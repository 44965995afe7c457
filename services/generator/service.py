"""The generator's use cases: step 1 (propose) and step 2 (respond) of a batch.

Free of any transport: the in-process composition and the queue workers call these.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from airoboros import telemetry
from airoboros.config import Config
from airoboros.contracts import (
    Artifact,
    BatchCompleted,
    BatchStats,
    CallsDeferred,
    Candidate,
    CandidatesProposed,
    CandidatesScreened,
    GenerateBatch,
    Item,
    Message,
    RespondToCandidates,
)
from airoboros.embeddings import l2_threshold_to_cosine
from airoboros.errors import BudgetExhausted, LLMError
from airoboros.generator.instructors.base import (
    Ctx,
    Filtered,
    Instructor,
    Spend,
    current_batch,
    current_spend,
    lose,
)
from airoboros.generator.registry import create
from airoboros.llm import LLMClient
from airoboros.llm.accounting import Usage
from airoboros.llm.batch import ReplayLLM

log = logging.getLogger(__name__)

Publish = Callable[[Message], Awaitable[None]]


@dataclass
class JobRuntime:
    """What generating for one job needs: its config and an LLM client built from it."""

    config: Config
    llm: LLMClient


#: The runtime of the job a command belongs to: embedded, the one job's; deployed, built
#: from the settings the command carries (``GenerateBatch.settings``).
Command = GenerateBatch | RespondToCandidates
RuntimeFor = Callable[[Command], Awaitable[JobRuntime]]


def share_tokens(candidates: Sequence[Candidate], tokens: float) -> None:
    """Spread ``tokens`` over the candidates by the length of their text."""
    sizes = [
        len(c.instruction) + len(c.response or "") + len(c.dedupe_text or "") + 1
        for c in candidates
    ]
    total = sum(sizes)
    for c, size in zip(candidates, sizes, strict=True):
        c.cost_tokens = max(0.0, tokens) * size / total


class GeneratorService:
    """Step 1 and step 2 of every batch. ``runtime_for(command)`` supplies the config and
    LLM client of the command's job (one job embedded; any number in a deployed worker)."""

    def __init__(
        self, runtime_for: RuntimeFor, publish: Publish, *, seed: int | None = None
    ) -> None:
        self.runtime_for = runtime_for
        self.publish = publish
        self._rng = random.Random(seed)
        self._instructors: dict[tuple[str, str], Instructor] = {}

    async def instructor(self, command: Command) -> tuple[Instructor, Config]:
        rt = await self.runtime_for(command)
        name = command.instructor
        key = (command.job_id, name)
        if key not in self._instructors:
            ctx = Ctx(name, rt.config, rt.llm, random.Random(self._rng.random()))
            self._instructors[key] = create(name, ctx)
        return self._instructors[key], rt.config

    async def replaying(self, command: Command, step: str) -> tuple[Instructor, ReplayLLM]:
        """(batch lane) A fresh instructor for one command, calling a ``ReplayLLM`` with
        the answers the command carries, its random choices seeded by the command's task:
        run again with more answers, it asks the same calls (airoboros.llm.batch)."""
        rt = await self.runtime_for(command)
        replay = ReplayLLM(rt.config, command.task_id, command.answers)
        seed = int(hashlib.sha256(f"{command.task_id}:{step}".encode()).hexdigest()[:15], 16)
        ctx = Ctx(command.instructor, rt.config, replay, random.Random(seed))  # type: ignore[arg-type]
        return create(command.instructor, ctx), replay

    async def _batch_lane(self, command: Command) -> bool:
        rt = await self.runtime_for(command)
        return command.instructor in rt.config.instructors and rt.config.batch_for(
            command.instructor
        )

    async def _deferred(self, command: Command, replay: ReplayLLM) -> bool:
        """Report the calls ``command`` still needs (True), or False when it had all."""
        # Calls started together (asyncio.gather) record theirs on their next step.
        for _ in range(3):
            await asyncio.sleep(0)
        if not replay.missing:
            # The run is final: what its answers cost is the job's usage now (the
            # meter's reports and budget; the store gets it with the batch's stats).
            rt = await self.runtime_for(command)
            for instructor, _model, a in replay.used:
                usage = Usage(1, a.prompt_tokens, a.completion_tokens, a.cost)
                rt.llm.meter.preload(instructor, usage)
            return False
        await self.publish(
            CallsDeferred(
                job_id=command.job_id,
                task_id=command.task_id,
                instructor=command.instructor,
                command=command.model_dump(mode="json"),
                calls=list(replay.missing.values()),
                headers=command.headers,
            )
        )
        return True

    def forget(self, job_id: str) -> None:
        for key in [k for k in self._instructors if k[0] == job_id]:
            del self._instructors[key]

    @telemetry.handles("generate", "generator")
    async def on_generate(self, task: GenerateBatch) -> None:
        """Step 1: propose candidates, then hand them to dedupe."""
        inst, config = await self.instructor(task)
        replay: ReplayLLM | None = None
        if await self._batch_lane(task):
            inst, replay = await self.replaying(task, "generate")
        stats = BatchStats(asked=task.batch_size)
        current_batch.set(stats)
        try:
            candidates = await inst.propose(task, stats)
        except Exception as exc:
            if replay is not None and await self._deferred(task, replay):
                return
            failed = await self._failed_proposal(task, stats, exc)
            if failed is None:
                return
            candidates = failed
        else:
            if replay is not None and await self._deferred(task, replay):
                return
        await self._proposed(task, inst, config, stats, candidates)

    async def _failed_proposal(
        self, task: GenerateBatch, stats: BatchStats, exc: Exception
    ) -> list[Candidate] | None:
        """What step 1 yields after ``exc``: none when it was filtered; None once a
        failed batch is reported. Any other error propagates."""
        if isinstance(exc, Filtered):
            exc.count(stats)
            log.debug("%s: batch filtered (%s)", task.instructor, exc.reason)
            return []
        if isinstance(exc, BudgetExhausted | LLMError):
            if isinstance(exc, LLMError):
                stats.failures += 1
            await self._report(task, stats, error=exc)
            return None
        raise exc

    async def _proposed(
        self,
        task: GenerateBatch,
        inst: Instructor,
        config: Config,
        stats: BatchStats,
        candidates: list[Candidate],
    ) -> None:
        stats.proposed = len(candidates)
        if not candidates:
            await self._report(task, stats)
            return
        # What a candidate takes with it when it is dropped later: its share of the
        # completion tokens that made it (the prompt bought its siblings too).
        productive = max(0.0, stats.tokens - stats.lost_tokens)
        share_tokens(candidates, productive * stats.completion_tokens / max(1, stats.tokens))
        if inst.spec.dedupe_scope == "none":
            await self.publish(
                CandidatesScreened(
                    job_id=task.job_id,
                    task_id=task.task_id,
                    instructor=task.instructor,
                    accepted=candidates,
                    stats=stats,
                    settings=task.settings,
                    headers=task.headers,
                )
            )
            return
        threshold = l2_threshold_to_cosine(config.min_docsearch_score_for(task.instructor))
        own = inst.spec.dedupe_scope == "own"
        await self.publish(
            CandidatesProposed(
                job_id=task.job_id,
                task_id=task.task_id,
                instructor=task.instructor,
                threshold=threshold,
                candidates=candidates,
                stats=stats,
                namespace=f"{task.job_id}:{task.instructor}" if own else None,
                settings=task.settings,
                headers=task.headers,
            )
        )

    @telemetry.handles("respond", "generator")
    async def on_respond(self, msg: RespondToCandidates) -> None:
        """Step 2: respond to every candidate the count has room for, concurrently;
        report the batch."""
        inst, _ = await self.instructor(msg)
        replay: ReplayLLM | None = None
        if await self._batch_lane(msg):
            inst, replay = await self.replaying(msg, "respond")
        stats = msg.stats.model_copy()
        current_batch.set(stats)

        async def respond(c: Candidate) -> tuple[Spend, Sequence[Item | Artifact]]:
            spend = Spend(c.cost_tokens)
            current_spend.set(spend)  # this task's own context: one spend per candidate
            try:
                return spend, await inst.respond(c, stats)
            except BaseException:
                # Its step-1 share and every call made for it bought nothing (the tokens
                # of unusable answers are counted already).
                lose(stats, spend.tokens - spend.lost)
                raise

        results = await asyncio.gather(
            *(respond(c) for c in msg.candidates), return_exceptions=True
        )
        if replay is not None and await self._deferred(msg, replay):
            return
        items: list[Item] = []
        artifacts: list[Artifact] = []
        error: BaseException | None = None
        for r in results:
            if isinstance(r, Filtered):
                r.count(stats)
            elif isinstance(r, BudgetExhausted):
                error = r
            elif isinstance(r, BaseException):
                if not isinstance(r, LLMError):
                    log.error("%s: response step crashed: %r", msg.instructor, r)
                stats.failures += 1
                error = error or r
            else:
                spend, products = r
                rows = [p for p in products if isinstance(p, Item)]
                artifacts.extend(p for p in products if isinstance(p, Artifact))
                # The candidate's tokens go with its rows: lost if they are dropped.
                paid = (spend.tokens - spend.lost) / max(1, len(rows))
                items.extend(row.model_copy(update={"cost_tokens": paid}) for row in rows)
        # A failed call among good rows is counted, not reported: the batch still delivered.
        if (items or artifacts) and not isinstance(error, BudgetExhausted):
            error = None
        await self._report(msg, stats, items=items, artifacts=artifacts, error=error)

    async def _report(
        self,
        origin: GenerateBatch | RespondToCandidates,
        stats: BatchStats,
        *,
        items: list[Item] | None = None,
        artifacts: list[Artifact] | None = None,
        error: BaseException | None = None,
    ) -> None:
        await self.publish(
            BatchCompleted(
                job_id=origin.job_id,
                task_id=origin.task_id,
                instructor=origin.instructor,
                items=items or [],
                artifacts=artifacts or [],
                stats=stats,
                error=getattr(error, "code", "error") if error is not None else None,
                error_message=str(error) if error is not None else None,
                headers=origin.headers,
            )
        )
