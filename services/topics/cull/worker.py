"""The cull step of the topics API: ``POST /v1/jobs/{id}/cull`` culls a finished job's
rows (airoboros.topics.cull.engine) into a new job, whose rows are the kept rows.

The new job is an ordinary job record (status running, then done; rows, items and export
as for any job) whose config is the source's plus ``cull_of: <source id>``. It runs in the
topics replica that holds its lease, as a background task that renews the lease; a
replica that finds a running cull job without a live owner resumes it (see
``TopicsService._take``). Progress lives in the object store (the plan, then the number
of decisions made with the verdicts, saved every few seconds) and in the rows
themselves: a kept row's source_id is its cluster's, so a resumed run writes no row twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airoboros.contracts import JobEvent
from airoboros.errors import AiroborosError, BudgetExhausted, Conflict, NotFoundError
from airoboros.protocol import CullRequest
from airoboros.topics.cull.engine import (
    LEGACY_CATEGORIES,
    PASS_THROUGH,
    CullRow,
    Judge,
    build_plan,
    fingerprint,
    judge_concurrency,
    judge_model,
    load_embedder,
    make_judge_llm,
    run_units,
)
from airoboros.topics.cull.ledger import StoreLedger
from airoboros.topics.lifecycle import preload_usage, record_usage
from airoboros.web import Principal
from airoboros.worker import job_config

if TYPE_CHECKING:
    from airoboros.ports import Embedder
    from airoboros.topics.service import TopicsService

log = logging.getLogger(__name__)

#: The key of a cull job's config naming the job it culls.
CULL_OF = "cull_of"
#: Source statuses that can be culled: the job ended and its dataset was exported.
CULLABLE = ("done", "budget_exhausted")


class JobNotFinished(Conflict):
    """The job to cull is still running (or ended without a dataset)."""

    code = "job_not_finished"


class CullUnavailable(AiroborosError):
    """This replica cannot embed (its image lacks the embedding model)."""

    code = "cull_unavailable"


def is_cull_job(config: dict[str, Any]) -> bool:
    return bool(config.get(CULL_OF))


class CullJobs:
    """Creates cull jobs and runs the ones this replica holds."""

    def __init__(self, svc: TopicsService) -> None:
        self.svc = svc
        self.tasks: dict[str, asyncio.Task[None]] = {}
        #: set by tests and by replicas that load a model at start; else loaded on first use
        self.embedder: Embedder | None = None

    def running(self, job_id: str) -> bool:
        return job_id in self.tasks

    async def create(
        self, source_id: str, request: CullRequest, principal: Principal
    ) -> dict[str, Any]:
        """Validate and start a cull of ``source_id``; returns the new job's status (the
        new job belongs to the caller, and judges with the source job's own key)."""
        source = await self.svc.store.jobs.get(source_id)  # NotFoundError: 404
        if source.status not in CULLABLE:
            raise JobNotFinished(
                f"job {source_id} is {source.status}: only a finished job "
                f"({' or '.join(CULLABLE)}) can be culled"
            )
        if self.embedder is None and importlib.util.find_spec("sentence_transformers") is None:
            raise CullUnavailable(
                "this topics service cannot embed rows: install airoboros[dedupe] in its image "
                "to cull through the API, or run `airoboros cull-instructions` on the export"
            )
        config = dict(source.config)
        config[CULL_OF] = source_id
        if request.threshold is not None:
            config["cull_threshold"] = request.threshold
        key = await self.svc.store.jobs.llm_api_key(source_id)
        job_config(self.svc.settings, config, api_key=key)  # the stored config must still load
        job_id = uuid.uuid4().hex
        await self.svc.store.jobs.ensure(
            job_id, config=config, targets={}, owner=principal.owner, llm_api_key=key
        )
        if await self.svc.store.jobs.try_lease(
            job_id, self.svc.owner, self.svc.settings.lease_seconds
        ):
            self.start(job_id)
        out = await self.svc.status(job_id, principal)
        out[CULL_OF] = source_id
        return out

    def start(self, job_id: str) -> None:
        """Run the job here (the caller holds its lease)."""
        if job_id in self.tasks:
            return
        task = asyncio.create_task(self._guarded(job_id))
        self.tasks[job_id] = task
        task.add_done_callback(lambda _t: self.tasks.pop(job_id, None))

    async def wait(self, job_id: str) -> None:
        task = self.tasks.get(job_id)
        if task is not None:
            await task

    async def _guarded(self, job_id: str) -> None:
        """Runs the cull while renewing the lease; stops it on a cancel request or a
        lost lease (another replica then owns the job and resumes it)."""
        jobs, svc = self.svc.store.jobs, self.svc
        work = asyncio.create_task(self._run(job_id))
        interval = max(0.5, svc.settings.lease_seconds / 3)
        stop: str | None = None
        try:
            while stop is None:
                done, _ = await asyncio.wait({work}, timeout=interval)
                if done:
                    break
                if not await jobs.try_lease(job_id, svc.owner, svc.settings.lease_seconds):
                    stop = "lost"
                elif (await jobs.get(job_id)).cancel_requested:
                    stop = "cancelled"
            if stop is not None:
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                if stop == "cancelled":
                    await self._finish(job_id, "cancelled", "cancelled by request")
                else:
                    log.warning("cull job %s: lease lost; another replica resumes it", job_id)
        except asyncio.CancelledError:
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            raise
        finally:
            if stop != "lost":
                with contextlib.suppress(Exception):
                    await jobs.release_lease(job_id, svc.owner)

    async def _finish(self, job_id: str, status: str, detail: str) -> None:
        await self.svc.store.jobs.set_status(job_id, status, detail)
        await self.svc.bus.publish(JobEvent(job_id=job_id, status=status, detail=detail))

    async def _embedder(self, job_config_: Any) -> Embedder:
        if self.embedder is None:
            self.embedder = await asyncio.to_thread(load_embedder, job_config_)
        return self.embedder

    async def _run(self, job_id: str) -> None:
        store = self.svc.store
        job = await store.jobs.get(job_id)
        source_id = str(job.config[CULL_OF])
        cfg = job_config(
            self.svc.settings, job.config, api_key=await store.jobs.llm_api_key(job_id)
        )
        items = [it async for it in store.rows.iterate(source_id)]
        rows = [
            CullRow(
                it.item.instruction,
                it.item.response,
                LEGACY_CATEGORIES.get(it.item.category, it.item.category),
                it.item.system,
                f"job {source_id} row {it.seq}",
            )
            for it in items
        ]
        llm = make_judge_llm(cfg, judge_model(cfg))
        await preload_usage(store.progress, job_id, llm.meter)
        ledger = StoreLedger(self.svc, job_id, items, rows)
        try:
            await self.svc.bus.publish(JobEvent(job_id=job_id, status="running"))
            judge = Judge(cfg, llm)
            lines = (json.dumps(it.item.to_row(), ensure_ascii=False) for it in items)
            fp = fingerprint(lines, rows, cfg, {"judge": judge.settings_key()})
            plan = await ledger.load_plan(fp)
            if plan is None:
                judged = any(r.category not in PASS_THROUGH for r in rows)
                embedder = await self._embedder(cfg) if judged else None
                if embedder is not None:
                    plan = await asyncio.to_thread(build_plan, rows, embedder=embedder, config=cfg)
                else:
                    plan = build_plan(rows, embedder=_NoEmbedder(), config=cfg)
                plan.fingerprint = fp
                await ledger.save_plan(plan)
            ledger.plan = plan
            await ledger.open()
            await run_units(plan, rows, judge, ledger, concurrency=judge_concurrency(cfg))
            await ledger.save()
            detail = ledger.counts.summary()
            # Export before the status: a job reads "done" only once its export exists.
            await self.svc.export(job_id)
            await self._finish(job_id, "done", detail)
            log.info("cull job %s of %s done: %s", job_id, source_id, detail)
        except BudgetExhausted as exc:
            await ledger.save()
            await self._finish(job_id, "budget_exhausted", f"{exc}; {ledger.counts.summary()}")
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await ledger.save()
            raise
        except NotFoundError as exc:
            await self._finish(job_id, "failed", f"source job gone: {exc}")
        except Exception as exc:
            log.exception("cull job %s failed", job_id)
            with contextlib.suppress(Exception):
                await ledger.save()
            await self._finish(job_id, "failed", f"{type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(Exception):
                await record_usage(store.progress, job_id, llm.meter)
            await llm.close()


class _NoEmbedder:
    """For a dataset with nothing to judge: build_plan embeds no row."""

    dim = 1

    def embed(self, texts: Sequence[str]) -> Any:
        raise AssertionError("nothing to embed")
