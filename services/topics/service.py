"""The topics service's use cases: jobs (create, status, cancel, rows, export), topic
generation, and the controllers of the jobs this replica holds the lease of.

Free of FastAPI: app.py translates HTTP to these calls and errors to responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from airoboros import telemetry
from airoboros.config import Config, parse_config
from airoboros.contracts import (
    AdapterPublished,
    Artifact,
    BatchCompleted,
    CandidatesProposed,
    CandidatesScreened,
    DatasetExported,
    GenerateBatch,
    RespondToCandidates,
)
from airoboros.errors import AiroborosError, ConfigError
from airoboros.generator.instructors.characters import card_file_name, card_json
from airoboros.pipeline import make_llm, make_plan
from airoboros.ports import ObjectStore
from airoboros.settings import TopicsSettings
from airoboros.store import SqlStore
from airoboros.topics.controller import JobController, JobOutcome, grant_and_forward, stop_policy
from airoboros.topics.topics import TopicPicker, generate_topics, unique
from airoboros.worker import job_config

log = logging.getLogger(__name__)
GROUP = "topics"


class JobConflict(AiroborosError):
    """The job is not in a state that allows this (409)."""

    code = "conflict"


#: The queues of the pipeline, declared by topics so no message waits for a consumer
#: that has not started yet: (message type, consumer group).
PIPELINE_QUEUES: list[tuple[type[Any], str]] = [
    (GenerateBatch, "generator"),
    (RespondToCandidates, "generator"),
    (CandidatesProposed, "dedupe"),
    (CandidatesScreened, GROUP),
    (BatchCompleted, GROUP),
    # Kept for the trainer, which may start later than the job ends.
    (DatasetExported, "trainer"),
    # Kept for the router, which reloads its experts when one is published.
    (AdapterPublished, "router"),
]


class TopicsService:
    def __init__(
        self, settings: TopicsSettings, store: SqlStore, bus: Any, objects: ObjectStore
    ) -> None:
        self.settings = settings
        self.store = store
        self.bus = bus
        self.objects = objects
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.controllers: dict[str, JobController] = {}
        self._starting: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rng = random.Random()
        from airoboros.topics.cull import CullJobs

        #: cull steps (POST /v1/jobs/{id}/cull) run by this replica
        self.culls = CullJobs(self)

    # --- jobs -----------------------------------------------------------------------------
    async def create_job(self, raw: Any) -> dict[str, Any]:
        """Validate a config (every problem at once) and start a job for it."""
        cfg = parse_config(raw, source="job")
        plan = make_plan(cfg)
        if not plan.active:
            raise ConfigError(["instructors: none of the listed categories can be generated"])
        job_id = uuid.uuid4().hex
        # Keys are never stored with a job: workers use their own OPENAI_API_KEY.
        stored = cfg.model_dump(mode="json", exclude={"openai_api_key"})
        await self.store.ensure_job(
            job_id,
            config=stored,
            targets=plan.targets,
            trace_context=telemetry.current_context(),
        )
        await self._take(job_id)
        out = await self.status(job_id)
        out["skipped"] = plan.skipped
        out["warnings"] = plan.warnings + (
            ["openai_api_key in a job config is ignored; the service's key is used"]
            if cfg.openai_api_key
            else []
        )
        return out

    async def _take(self, job_id: str) -> None:
        """Become the job's controller if no live replica is."""
        if job_id in self.controllers or job_id in self._starting or self.culls.running(job_id):
            return
        if not await self.store.try_lease(job_id, self.owner, self.settings.lease_seconds):
            return
        self._starting.add(job_id)
        try:
            job = await self.store.get_job(job_id)
            from airoboros.topics.cull import is_cull_job

            if is_cull_job(job.config):  # a cull step, not a generation: resume it here
                self.culls.start(job_id)
                return
            cfg = job_config(self.settings, job.config)
            plan = make_plan(cfg)
            topics = await self._topics(job_id, cfg)
            from airoboros.generator.registry import implemented_instructors

            impl = implemented_instructors()
            pickers: dict[str, TopicPicker | None] = {}
            for name in plan.active:
                cls = impl[name]
                pickers[name] = (
                    TopicPicker(topics, cls.topic_mode, random.Random(self._rng.random()))
                    if cls.uses_topics and topics
                    else None
                )

            async def on_finish(outcome: JobOutcome) -> None:
                if outcome.status in ("done", "incomplete", "budget_exhausted"):
                    with telemetry.span(
                        "export",
                        parent=job.trace_context or None,
                        attributes={"airoboros.service": "topics", "airoboros.job_id": job_id},
                    ):
                        await self.export(job_id)

            async def on_artifacts(cards: list[Artifact]) -> None:
                # Cards are kept beside the job's exports, one JSON object each.
                for card in cards:
                    key = f"jobs/{job_id}/characters/{card_file_name(card)}"
                    if not await self.objects.exists(key):
                        await self.objects.put_bytes(key, card_json(card).encode())

            ctl = JobController(
                job_id,
                cfg,
                self.store,
                self.bus.publish,
                active=plan.active,
                pickers=pickers,
                on_finish=on_finish,
                on_artifacts=on_artifacts,
                trace_context=job.trace_context,
            )
            self.controllers[job_id] = ctl
            await ctl.start()
        except Exception as exc:
            log.exception("job %s could not start", job_id)
            await self.store.set_job_status(job_id, "failed", f"could not start: {exc}")
        finally:
            self._starting.discard(job_id)

    async def _topics(self, job_id: str, cfg: Config) -> list[str]:
        """Inline topics, or topics generated once per job and kept in the object store
        (services share no file system, so topics_path files do not apply)."""
        from airoboros.generator.registry import implemented_instructors

        impl = implemented_instructors()
        if not any(impl[n].uses_topics for n in cfg.instructors if n in impl):
            return []
        if cfg.topics:
            return unique(cfg.topics)
        key = f"jobs/{job_id}/topics.txt"
        if await self.objects.exists(key):
            return [t for t in (await self.objects.get_bytes(key)).decode().splitlines() if t]
        llm = make_llm(cfg)
        try:
            topics = await generate_topics(cfg, llm, None)
        finally:
            await llm.close()
            u = llm.meter.by_instructor.get("topics")
            if u is not None:
                await self.store.add_stats(
                    job_id,
                    "topics",
                    requests=u.requests,
                    prompt_tokens=u.prompt_tokens,
                    completion_tokens=u.completion_tokens,
                    cost=u.cost,
                )
        await self.objects.put_bytes(key, ("\n".join(topics) + "\n").encode())
        return topics

    async def cull(self, job_id: str, request: Any) -> dict[str, Any]:
        """Cull a finished job's rows into a new job (airoboros.topics.cull)."""
        return await self.culls.create(job_id, request)

    async def status(self, job_id: str) -> dict[str, Any]:
        job = await self.store.get_job(job_id)
        stats = await self.store.stats(job_id)
        in_flight = await self.store.in_flight(job_id)
        try:
            policy = stop_policy(Config.model_validate(job.config))
        except ValueError:
            policy = stop_policy(Config())
        instructors = {}
        for name, s in stats.items():
            if name == "topics":
                continue
            instructors[name] = {
                "accepted": s.accepted,
                "target": s.target,
                "duplicates": s.duplicates,
                "filtered": s.filtered,
                "refused": s.refused,
                "unparseable": s.unparseable,
                "truncated": s.truncated,
                "failures": s.failures,
                "dropped": s.dropped,
                "withheld": s.withheld,
                "retries": s.retries,
                "in_flight": in_flight.get(name, 0),
                "reserved": s.reserved,
                "prompt_tokens": s.prompt_tokens,
                "completion_tokens": s.completion_tokens,
                "cost": round(s.cost, 6),
                "wasted_tokens": round(s.wasted_tokens),
                "stopped": s.stop_reason(policy),
                "skipped": s.skipped,
            }
        return {
            "id": job.id,
            "status": job.status,
            "detail": job.detail,
            "created_at": job.created_at.isoformat(),
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "cancel_requested": job.cancel_requested,
            "instructors": instructors,
            "rows": await self.store.count_items(job_id),
            "tokens": {
                "prompt": sum(s.prompt_tokens for s in stats.values()),
                "completion": sum(s.completion_tokens for s in stats.values()),
            },
            "cost": round(sum(s.cost for s in stats.values()), 6),
            "dead_letters": await self.store.dead_letters(job_id),
            "export": job.export_uri,
            # Experts trained on this job's dataset (the trainer's registry rows).
            "experts": [
                {
                    "expert": a.expert,
                    "version": a.version,
                    "status": a.status,
                    "uri": a.uri,
                    "metrics": a.metrics,
                    "detail": a.detail,
                }
                for a in await self.store.adapters(job_id=job_id)
            ],
        }

    async def list_jobs(self) -> list[dict[str, Any]]:
        return [
            {"id": j.id, "status": j.status, "created_at": j.created_at.isoformat()}
            for j in await self.store.list_jobs()
        ]

    async def cancel(self, job_id: str) -> dict[str, Any]:
        await self.store.request_cancel(job_id)
        ctl = self.controllers.get(job_id)
        if ctl is not None:
            await ctl.tick()
        return await self.status(job_id)

    async def resume(self, job_id: str) -> dict[str, Any]:
        """Run a stopped job again: every category short of its count is tried again
        from the stored counts (no earlier stop is kept as a verdict)."""
        job = await self.store.get_job(job_id)
        from airoboros.topics.cull import is_cull_job

        if is_cull_job(job.config):
            raise JobConflict("a cull job cannot be resumed; post the cull again")
        if job.status == "done":
            raise JobConflict(f"job {job_id} is done: every category reached its count")
        if job.status == "budget_exhausted":
            raise JobConflict(
                f"job {job_id} spent its budget ({job.detail}); post a new job with a larger "
                "max_tokens or max_cost"
            )
        await self.store.resume_job(job_id)
        ctl = self.controllers.pop(job_id, None)
        if ctl is not None and ctl.finished:
            await self.store.release_lease(job_id, self.owner)
        elif ctl is not None:
            self.controllers[job_id] = ctl  # still running: its next tick sees the reset
        await self._take(job_id)
        return await self.status(job_id)

    async def items(
        self, job_id: str, *, category: str | None, after: int, limit: int
    ) -> dict[str, Any]:
        await self.store.get_job(job_id)
        rows = []
        async for it in self.store.iter_items(
            job_id, after=after, category=category, page_size=limit
        ):
            rows.append({"seq": it.seq, **it.item.to_row()})
            if len(rows) >= limit:
                break
        return {"items": rows, "next_after": rows[-1]["seq"] if len(rows) == limit else None}

    async def export_lines(self, job_id: str) -> AsyncIterator[bytes]:
        await self.store.get_job(job_id)
        async for it in self.store.iter_items(job_id):
            yield (json.dumps(it.item.to_row(), ensure_ascii=False) + "\n").encode()

    async def export_stream(self, job_id: str, fmt: str) -> AsyncIterator[bytes]:
        """The job's rows converted to ``fmt`` (see airoboros.exports), streamed."""
        from airoboros.contracts import Item
        from airoboros.exports import aiter_export

        async def rows() -> AsyncIterator[Item]:
            async for it in self.store.iter_items(job_id):
                yield it.item

        async for chunk in aiter_export(rows(), fmt):
            yield chunk

    async def export(self, job_id: str) -> DatasetExported:
        """Write the dataset to the object store (JSONL in the original format, one file
        per category, then a manifest, last, that names them) and announce it."""
        per_cat: dict[str, list[bytes]] = defaultdict(list)
        all_lines: list[bytes] = []
        async for it in self.store.iter_items(job_id):
            line = (json.dumps(it.item.to_row(), ensure_ascii=False) + "\n").encode()
            all_lines.append(line)
            per_cat[it.item.category].append(line)
        base = f"jobs/{job_id}/export"
        uri = await self.objects.put_bytes(f"{base}/instructions.jsonl", b"".join(all_lines))
        files = {}
        for cat, lines in sorted(per_cat.items()):
            files[cat] = await self.objects.put_bytes(f"{base}/{cat}.jsonl", b"".join(lines))
        counts = {cat: len(lines) for cat, lines in per_cat.items()}
        manifest = {"job_id": job_id, "dataset": uri, "files": files, "counts": counts}
        await self.objects.put_bytes(f"{base}/manifest.json", json.dumps(manifest).encode())
        await self.store.set_export(job_id, uri)
        event = DatasetExported(
            job_id=job_id, uri=uri, rows=len(all_lines), files=files, counts=counts
        )
        await self.bus.publish(event)
        log.info("job %s exported: %d rows to %s", job_id, len(all_lines), uri)
        return event

    async def generate_topics(self, raw: Any) -> list[str]:
        cfg = job_config(self.settings, parse_config(raw, source="request").model_dump())
        llm = make_llm(cfg)
        try:
            return await generate_topics(cfg, llm, None)
        finally:
            await llm.close()

    # --- the pipeline's results -----------------------------------------------------------
    async def on_completed(self, msg: BatchCompleted) -> None:
        with telemetry.span(
            "store rows",
            attributes={
                "airoboros.service": "topics",
                "airoboros.job_id": msg.job_id,
                "airoboros.instructor": msg.instructor,
                "airoboros.rows": len(msg.items),
            },
        ):
            await self._on_completed(msg)

    async def _on_completed(self, msg: BatchCompleted) -> None:
        ctl = self.controllers.get(msg.job_id)
        if ctl is not None and not ctl.finished:
            await ctl.on_completed(msg)
            return
        # Another replica drives this job (or none yet): commit the batch here; the
        # job's controller sees it at its next tick.
        await self.store.apply_batch(
            msg.job_id,
            message_id=msg.message_id,
            task_id=msg.task_id,
            instructor=msg.instructor,
            items=msg.items,
            stats=msg.stats,
            artifacts=msg.artifacts,
            error=msg.error,
            error_message=msg.error_message,
        )

    async def on_screened(self, msg: CandidatesScreened) -> None:
        """Reserve room in the count for a screened batch (the store serialises this with
        every other replica) and send on what fits."""
        ctl = self.controllers.get(msg.job_id)
        if ctl is not None and not ctl.finished:
            await ctl.on_screened(msg)
            return
        done = await grant_and_forward(self.store, self.bus.publish, msg)
        if done is not None:
            await self._on_completed(done)

    async def on_dead_letter(self, queue: str, body: bytes, headers: dict[str, Any]) -> None:
        try:
            data = json.loads(body)
        except ValueError:
            data = {}
        await self.store.add_dead_letter(
            queue=queue,
            body=body.decode(errors="replace")[:100_000],
            job_id=data.get("job_id") if isinstance(data, dict) else None,
            message_id=data.get("message_id") if isinstance(data, dict) else None,
            kind=data.get("kind") if isinstance(data, dict) else None,
        )
        log.warning("dead-lettered message from %s recorded", queue)

    # --- the loop that keeps jobs moving ----------------------------------------------------
    async def tick_all(self) -> None:
        for job_id in await self.store.running_jobs():
            ctl = self.controllers.get(job_id)
            if ctl is None:
                await self._take(job_id)  # new, or orphaned by a replica that died
                continue
            if not await self.store.try_lease(job_id, self.owner, self.settings.lease_seconds):
                self.controllers.pop(job_id, None)  # lost the lease (we were too slow)
                continue
            await ctl.tick()
        for job_id, ctl in list(self.controllers.items()):
            if ctl.finished:
                self.controllers.pop(job_id, None)
                await self.store.release_lease(job_id, self.owner)

    async def run_ticks(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick_all()
            except Exception:
                log.exception("controller tick failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.settings.tick_interval)
