"""The generator's use cases: step 1 (propose) and step 2 (respond) of a batch.

Free of any transport: the in-process composition and the queue workers call these.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from airoboros.config import Config
from airoboros.contracts import (
    BatchCompleted,
    BatchStats,
    CandidatesProposed,
    CandidatesScreened,
    GenerateBatch,
    Item,
    Message,
)
from airoboros.embeddings import l2_threshold_to_cosine
from airoboros.errors import BudgetExhausted, LLMError
from airoboros.generator.instructors.base import Ctx, Filtered, Instructor, current_batch
from airoboros.generator.registry import create
from airoboros.llm import LLMClient

log = logging.getLogger(__name__)

Publish = Callable[[Message], Awaitable[None]]


class GeneratorService:
    def __init__(
        self, config: Config, llm: LLMClient, publish: Publish, *, seed: int | None = None
    ) -> None:
        self.config = config
        self.llm = llm
        self.publish = publish
        self._rng = random.Random(seed)
        self._instructors: dict[str, Instructor] = {}

    def instructor(self, name: str) -> Instructor:
        if name not in self._instructors:
            ctx = Ctx(name, self.config, self.llm, random.Random(self._rng.random()))
            self._instructors[name] = create(name, ctx)
        return self._instructors[name]

    async def on_generate(self, task: GenerateBatch) -> None:
        """Step 1: propose candidates, then hand them to dedupe."""
        inst = self.instructor(task.instructor)
        stats = BatchStats()
        current_batch.set(stats)
        try:
            candidates = await inst.propose(task, stats)
        except Filtered as f:
            stats.filtered += 1
            log.debug("%s: batch filtered (%s)", task.instructor, f.reason)
            candidates = []
        except BudgetExhausted as exc:
            await self._fail(task.job_id, task.task_id, task.instructor, stats, exc.code, str(exc))
            return
        except LLMError as exc:
            stats.failures += 1
            await self._fail(task.job_id, task.task_id, task.instructor, stats, exc.code, str(exc))
            return
        stats.proposed = len(candidates)
        if not candidates:
            await self.publish(
                BatchCompleted(
                    job_id=task.job_id,
                    task_id=task.task_id,
                    instructor=task.instructor,
                    stats=stats,
                )
            )
            return
        threshold = l2_threshold_to_cosine(self.config.min_docsearch_score_for(task.instructor))
        await self.publish(
            CandidatesProposed(
                job_id=task.job_id,
                task_id=task.task_id,
                instructor=task.instructor,
                threshold=threshold,
                candidates=candidates,
                stats=stats,
                headers=task.headers,
            )
        )

    async def on_screened(self, msg: CandidatesScreened) -> None:
        """Step 2: respond to every accepted candidate, concurrently; report the batch."""
        inst = self.instructor(msg.instructor)
        stats = msg.stats.model_copy()
        current_batch.set(stats)
        results = await asyncio.gather(
            *(inst.respond(c, stats) for c in msg.accepted), return_exceptions=True
        )
        items: list[Item] = []
        error: BaseException | None = None
        for r in results:
            if isinstance(r, Filtered):
                stats.filtered += 1
            elif isinstance(r, BudgetExhausted):
                error = r
            elif isinstance(r, LLMError):
                stats.failures += 1
                error = error or r
            elif isinstance(r, BaseException):
                log.error("%s: response step crashed: %r", msg.instructor, r)
                stats.failures += 1
                error = error or r
            else:
                items.extend(r)
        code = getattr(error, "code", None) if error is not None else None
        await self.publish(
            BatchCompleted(
                job_id=msg.job_id,
                task_id=msg.task_id,
                instructor=msg.instructor,
                items=items,
                stats=stats,
                error=code if isinstance(error, BudgetExhausted) or not items else None,
                error_message=str(error) if error is not None else None,
                headers=msg.headers,
            )
        )

    async def _fail(
        self, job_id: str, task_id: str, instructor: str, stats: BatchStats, code: str, message: str
    ) -> None:
        await self.publish(
            BatchCompleted(
                job_id=job_id,
                task_id=task_id,
                instructor=instructor,
                stats=stats,
                error=code,
                error_message=message,
            )
        )
