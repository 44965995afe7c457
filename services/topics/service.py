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
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from airoboros import telemetry
from airoboros.config import Config, parse_config
from airoboros.contracts import (
    AdapterPublished,
    BatchCompleted,
    CallsDeferred,
    CandidatesProposed,
    CandidatesScreened,
    DatasetExported,
    GenerateBatch,
    RespondToCandidates,
)
from airoboros.errors import ConfigError, Conflict, NotFoundError, is_unavailable
from airoboros.jobboard import InMemoryJobBoard, JobBoard
from airoboros.llm.factory import make_llm
from airoboros.policy import ServerPolicy
from airoboros.ports import ObjectStore
from airoboros.settings import TopicsSettings
from airoboros.store import JobRecord, Store, StoredItem
from airoboros.topics.batches import store_deferred
from airoboros.topics.controller import JobController, JobOutcome, grant_and_forward, stop_policy
from airoboros.topics.lifecycle import CardShelf, JobAdapters, make_plan, open_job
from airoboros.topics.topics import ObjectTopics, generate_topics
from airoboros.web import Principal
from airoboros.worker import job_config

log = logging.getLogger(__name__)
GROUP = "topics"
#: job statuses whose rows are exported (every row kept)
EXPORTED = ("done", "incomplete", "budget_exhausted")
#: seconds between tries of a failed export: growing, then every minute
EXPORT_BACKOFF = (2.0, 5.0, 15.0, 30.0, 60.0)


def _text(value: Any) -> str | None:
    """A header's value as text (AMQP headers may arrive as bytes)."""
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def row_of(it: StoredItem) -> dict[str, Any]:
    """A stored row as the API lists it (``ItemRow``)."""
    return {"seq": it.seq, **it.item.to_row(), "bad": it.bad}


class JobConflict(Conflict):
    """The job is not in a state that allows this."""


#: The queues of the pipeline, declared by topics so no message waits for a consumer
#: that has not started yet: (message type, consumer group).
PIPELINE_QUEUES: list[tuple[type[Any], str]] = [
    (GenerateBatch, "generator"),
    (RespondToCandidates, "generator"),
    (CandidatesProposed, "dedupe"),
    (CandidatesScreened, GROUP),
    (BatchCompleted, GROUP),
    (CallsDeferred, GROUP),
    # Kept for the trainer, which may start later than the job ends.
    (DatasetExported, "trainer"),
    # Kept for the router, which reloads its experts when one is published.
    (AdapterPublished, "router"),
]


class TopicsService:
    def __init__(
        self,
        settings: TopicsSettings,
        store: Store,
        bus: Any,
        objects: ObjectStore,
        board: JobBoard | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.bus = bus
        self.objects = objects
        #: what the generator workers read of each job (status, its own key)
        self.board: JobBoard = board or InMemoryJobBoard()
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.controllers: dict[str, JobController] = {}
        self._starting: set[str] = set()
        #: per job: a resume and the tick that retires the job's finished controller take
        #: turns (otherwise the tick's "cancelled" could reach the job board after the
        #: resumed run's "running", and the workers dropped the resumed run's tasks)
        self._job_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rng = random.Random()
        self.policy = ServerPolicy.from_settings(settings)
        #: failed exports: (attempts, when the next may run), per job (a pacing hint)
        self._export_backoff: dict[str, tuple[int, float]] = {}
        from airoboros.topics.cull.worker import CullJobs

        #: cull steps (POST /v1/jobs/{id}/cull) run by this replica
        self.culls = CullJobs(self)

    # --- jobs -----------------------------------------------------------------------------
    def review(self, raw: Any, source: str) -> tuple[Config, list[str]]:
        """A posted config, checked against the server's policy (no path, model or
        endpoint it may not use; bounded counts) before anything else reads it, then
        validated: (the config, warnings). Every problem at once, as ConfigError."""
        if not isinstance(raw, dict):
            parse_config(raw, source=source)  # raises: not a mapping
        kept, problems, warnings = self.policy.review(raw)
        if problems:
            raise ConfigError(problems)
        return parse_config(kept, source=source), warnings

    async def create_job(self, raw: Any, principal: Principal) -> dict[str, Any]:
        """Validate a config (every problem at once) and start a job for it, owned by
        the caller's key."""
        cfg, warnings = self.review(raw, "job")
        await self.check_uploads(cfg, principal)
        job_id = uuid.uuid4().hex
        plan = make_plan(cfg, job_id)
        if not plan.active:
            raise ConfigError(["instructors: none of the listed categories can be generated"])
        # The job's own key (for its own endpoint) is kept apart from its config.
        stored = cfg.model_dump(mode="json", exclude={"openai_api_key"})
        await self.store.jobs.ensure(
            job_id,
            config=stored,
            targets=plan.targets,
            trace_context=telemetry.current_context(),
            owner=principal.owner,
            llm_api_key=cfg.openai_api_key,
        )
        await self._take(job_id)
        out = await self.status(job_id, principal)
        out["skipped"] = plan.skipped
        out["warnings"] = plan.warnings + warnings
        return out

    # --- documents ---------------------------------------------------------------------
    async def upload_documents(self, files: list[Any], principal: Principal) -> dict[str, Any]:
        """Keep posted documents in the object store under ``uploads/<id>/`` for jobs of
        the same key to use (``documents_upload: <id>``). Only .txt, .md and .pdf files,
        by name and by content; the upload must give at least one usable passage."""
        from airoboros.documents import SUFFIXES, DocumentsError, load_passages

        if not files:
            raise ConfigError(["files: send one or more files in the multipart field 'files'"])
        problems: list[str] = []
        named: dict[str, bytes] = {}
        for f in files:
            name = str(f.filename or "")
            data = await f.read()
            base = name
            if (
                not base
                or base.startswith(".")
                or any(c in base for c in "/\\\x00")
                or len(base) > 200
            ):
                problems.append(f"files: {name!r} is not a usable file name (no folders)")
            elif Path(base).suffix.lower() not in SUFFIXES:
                problems.append(f"files: {base}: only {', '.join(SUFFIXES)} files are accepted")
            elif base in named:
                problems.append(f"files: {base} is sent twice")
            elif Path(base).suffix.lower() == ".pdf" and not data.startswith(b"%PDF-"):
                problems.append(f"files: {base} is not a PDF")
            elif Path(base).suffix.lower() != ".pdf" and (b"\x00" in data or not _utf8(data)):
                problems.append(f"files: {base} is not UTF-8 text")
            else:
                named[base] = data
        if problems:
            raise ConfigError(problems)
        upload_id = "up-" + uuid.uuid4().hex
        folder = Path(self.settings.work_dir) / "uploads" / upload_id
        folder.mkdir(parents=True, exist_ok=True)
        for base, data in named.items():
            (folder / base).write_bytes(data)
        try:
            passages = await asyncio.to_thread(load_passages, folder, 300)
        except DocumentsError as exc:
            raise ConfigError([f"files: {exc}"]) from None
        for base, data in named.items():
            await self.objects.put_bytes(f"uploads/{upload_id}/{base}", data)
        listing = [{"name": base, "bytes": len(data)} for base, data in named.items()]
        await self.store.uploads.add(upload_id, owner=principal.owner, files=listing)
        return {"id": upload_id, "files": listing, "passages": len(passages)}

    async def check_uploads(self, cfg: Config, principal: Principal) -> None:
        """Every documents_upload of a posted config names an upload of the caller."""
        problems = []
        for name, inst in cfg.instructors.items():
            upload = inst.extra("documents_upload")
            if not isinstance(upload, str):
                continue
            try:
                owner, _ = await self.store.uploads.get(upload)
            except NotFoundError:
                owner = None
            if not principal.may_see(owner):
                problems.append(f"instructors.{name}.documents_upload: no upload {upload!r}")
        if problems:
            raise ConfigError(problems)

    async def unpack_uploads(self, cfg: Config) -> None:
        """Point each documents_upload of a job's config at a local copy of its files
        (fetched from the object store once per replica), for the controller side of
        the documents instructor to read."""
        for inst in cfg.instructors.values():
            upload = inst.extra("documents_upload")
            if not isinstance(upload, str):
                continue
            _, files = await self.store.uploads.get(upload)
            folder = Path(self.settings.work_dir) / "uploads" / upload
            folder.mkdir(parents=True, exist_ok=True)
            for f in files:
                target = folder / str(f["name"])
                if not target.exists() or target.stat().st_size != int(f["bytes"]):
                    data = await self.objects.get_bytes(f"uploads/{upload}/{f['name']}")
                    tmp = target.with_suffix(target.suffix + ".part")
                    tmp.write_bytes(data)
                    tmp.replace(target)
            assert inst.model_extra is not None
            inst.model_extra["documents_path"] = str(folder)

    async def job(self, job_id: str, principal: Principal) -> JobRecord:
        """The job, if the caller may see it; else the same 404 as for no job at all."""
        job = await self.store.jobs.get(job_id)
        if not principal.may_see(job.owner):
            raise NotFoundError(f"no job {job_id!r}")
        return job

    async def _take(self, job_id: str) -> None:
        """Become the job's controller if no live replica is."""
        if job_id in self.controllers or job_id in self._starting or self.culls.running(job_id):
            return
        if not await self.store.jobs.try_lease(job_id, self.owner, self.settings.lease_seconds):
            return
        self._starting.add(job_id)
        try:
            job = await self.store.jobs.get(job_id)
            from airoboros.topics.cull.worker import is_cull_job

            if is_cull_job(job.config):  # a cull step, not a generation: resume it here
                self.culls.start(job_id)
                return
            cfg = job_config(
                self.settings, job.config, api_key=await self.store.jobs.llm_api_key(job_id)
            )
            await self.unpack_uploads(cfg)

            async def on_finish(outcome: JobOutcome) -> None:
                if outcome.status in EXPORTED:
                    with telemetry.span(
                        "export",
                        parent=job.trace_context or None,
                        attributes={"airoboros.service": "topics", "airoboros.job_id": job_id},
                    ):
                        await self.export_or_retry_later(job_id)

            adapters = JobAdapters(
                store=self.store,
                publish=self.bus.publish,
                topics=ObjectTopics(self.objects, f"jobs/{job_id}/topics.txt"),
                # Cards are kept beside the job's exports, one JSON object each.
                cards=CardShelf(self.objects, f"jobs/{job_id}/characters/"),
                on_finish=on_finish,
                trace_context=job.trace_context,
            )
            llm = make_llm(cfg)  # for the job's topics, if it needs them generated
            try:
                _, ctl = await open_job(
                    job_id, cfg, adapters, llm, rng=random.Random(self._rng.random())
                )
            finally:
                await llm.close()
            self.controllers[job_id] = ctl
            await self.post(job_id, "running")
            await ctl.start()
        except Exception as exc:
            log.exception("job %s could not start", job_id)
            await self.store.jobs.set_status(job_id, "failed", f"could not start: {exc}")
        finally:
            self._starting.discard(job_id)

    async def cull(self, job_id: str, request: Any, principal: Principal) -> dict[str, Any]:
        """Cull a finished job's rows into a new job (airoboros.topics.cull)."""
        await self.job(job_id, principal)
        return await self.culls.create(job_id, request, principal)

    async def status(self, job_id: str, principal: Principal) -> dict[str, Any]:
        job = await self.job(job_id, principal)
        stats = await self.store.progress.stats(job_id)
        in_flight = await self.store.progress.in_flight(job_id)
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
            # The dataset's rows (what an export holds) and those marked bad, left out.
            "rows": await self.store.rows.count(job_id),
            "bad_rows": await self.store.rows.count_bad(job_id),
            "tokens": {
                "prompt": sum(s.prompt_tokens for s in stats.values()),
                "completion": sum(s.completion_tokens for s in stats.values()),
            },
            "cost": round(sum(s.cost for s in stats.values()), 6),
            "dead_letters": await self.store.dead_letters.for_job(job_id),
            # (batch lane) per instructor, its batch jobs by state (submitting, open,
            # completed, expired, failed, cancelled)
            "batches": await self.store.batches.counts(job_id),
            "export": job.export_uri,
            "export_pending": job.export_pending,
            "export_error": job.export_error,
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
                for a in await self.store.registry.adapters(job_id=job_id)
            ],
        }

    async def list_jobs(self, principal: Principal) -> list[dict[str, Any]]:
        owner = None if principal.admin else principal.owner
        return [
            {"id": j.id, "status": j.status, "created_at": j.created_at.isoformat()}
            for j in await self.store.jobs.recent(owner=owner)
        ]

    async def post(self, job_id: str, status: str) -> None:
        """Tell the workers the job's status (and, while it runs, its own key). Best
        effort: with the board's Redis down the workers wait anyway, and the next tick
        writes it again."""
        try:
            key = await self.store.jobs.llm_api_key(job_id) if status == "running" else None
            await self.board.post(job_id, status, api_key=key)
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            log.warning("job %s: cannot post its status to the job board: %s", job_id, exc)

    async def cancel(self, job_id: str, principal: Principal) -> dict[str, Any]:
        await self.job(job_id, principal)
        await self.store.jobs.request_cancel(job_id)
        await self.post(job_id, "cancelled")  # workers stop paying for it now
        ctl = self.controllers.get(job_id)
        if ctl is not None:
            await ctl.tick()
        return await self.status(job_id, principal)

    async def resume(self, job_id: str, principal: Principal) -> dict[str, Any]:
        """Run a stopped job again: every category short of its count is tried again
        from the stored counts (no earlier stop is kept as a verdict)."""
        job = await self.job(job_id, principal)
        from airoboros.topics.cull.worker import is_cull_job

        if is_cull_job(job.config):
            raise JobConflict("a cull job cannot be resumed; post the cull again")
        if job.status == "done":
            raise JobConflict(f"job {job_id} is done: every category reached its count")
        if job.status == "budget_exhausted":
            raise JobConflict(
                f"job {job_id} spent its budget ({job.detail}); post a new job with a larger "
                "max_tokens or max_cost"
            )
        async with self._job_lock(job_id):
            await self.store.jobs.resume(job_id)
            ctl = self.controllers.pop(job_id, None)
            if ctl is not None and ctl.finished:
                await self.store.jobs.release_lease(job_id, self.owner)
            elif ctl is not None:
                self.controllers[job_id] = ctl  # still running: its next tick sees the reset
            await self._take(job_id)
        return await self.status(job_id, principal)

    def _job_lock(self, job_id: str) -> asyncio.Lock:
        return self._job_locks.setdefault(job_id, asyncio.Lock())

    async def items(
        self,
        job_id: str,
        principal: Principal,
        *,
        category: str | None,
        after: int,
        limit: int,
        q: str | None = None,
    ) -> dict[str, Any]:
        """A page of the job's rows, those marked bad included (so they can be unmarked);
        with ``q``, only rows whose instruction, response or system contains it (any
        case)."""
        await self.job(job_id, principal)
        rows = []
        async for it in self.store.rows.iterate(
            job_id, after=after, category=category, page_size=limit, include_bad=True, search=q
        ):
            rows.append(row_of(it))
            if len(rows) >= limit:
                break
        return {"items": rows, "next_after": rows[-1]["seq"] if len(rows) == limit else None}

    async def mark_bad(
        self, job_id: str, seq: int, bad: bool, principal: Principal
    ) -> dict[str, Any]:
        """Mark a row bad (left out of every export and cull, kept in the store) or good
        again; the same 404 for no job, another owner's job and no such row."""
        await self.job(job_id, principal)
        return row_of(await self.store.rows.mark_bad(job_id, seq, bad))

    async def experts(self, principal: Principal) -> list[dict[str, Any]]:
        """The registered expert versions the caller may see: every one for an admin key,
        else those trained on the caller's own jobs."""
        versions = await self.store.registry.adapters()
        if not principal.admin:
            owners: dict[str, str | None] = {}
            for job_id in {a.job_id for a in versions if a.job_id is not None}:
                try:
                    owners[job_id] = (await self.store.jobs.get(job_id)).owner
                except NotFoundError:
                    owners[job_id] = None
            versions = [
                a for a in versions if a.job_id is not None and principal.may_see(owners[a.job_id])
            ]
        return [
            {
                "expert": a.expert,
                "version": a.version,
                "base_model": a.base_model,
                "status": a.status,
                "job_id": a.job_id,
                "dataset_uri": a.dataset_uri,
                "uri": a.uri,
                "metrics": a.metrics,
                "detail": a.detail,
                "created_at": a.created_at.isoformat(),
            }
            for a in versions
        ]

    async def export_stream(self, job_id: str, fmt: str) -> AsyncIterator[bytes]:
        """The job's rows converted to ``fmt`` (see airoboros.exports), streamed; rows
        marked bad are left out (``RowRepository.iterate``)."""
        from airoboros.contracts import Item
        from airoboros.exports import aiter_export

        async def rows() -> AsyncIterator[Item]:
            async for it in self.store.rows.iterate(job_id):
                yield it.item

        async for chunk in aiter_export(rows(), fmt):
            yield chunk

    async def export_or_retry_later(self, job_id: str) -> None:
        """Export a finished job; when the object store is down (or the export fails
        otherwise), the job keeps its status with its export pending, and the ticks of
        any replica retry it with backoff until it lands (``retry_exports``)."""
        await self.store.jobs.set_export_pending(job_id, True, None)  # the intent is durable
        try:
            await self.export(job_id)
        except Exception as exc:
            log.warning("job %s: export failed, will retry: %s", job_id, exc)
            await self.store.jobs.set_export_pending(job_id, True, str(exc))
            self._export_backoff[job_id] = (1, time.monotonic() + EXPORT_BACKOFF[0])
            return
        await self.store.jobs.set_export_pending(job_id, False, None)
        self._export_backoff.pop(job_id, None)

    async def retry_exports(self) -> None:
        """Try again the exports that failed, each after its backoff, one replica at a
        time per job (the job's lease)."""
        now = time.monotonic()
        for job_id in await self.store.jobs.pending_exports():
            attempts, due = self._export_backoff.get(job_id, (0, 0.0))
            if due > now or job_id in self.controllers:
                continue
            if not await self.store.jobs.try_lease(job_id, self.owner, self.settings.lease_seconds):
                continue
            try:
                await self.store.jobs.set_export_pending(job_id, True, None)
                await self.export(job_id)
            except Exception as exc:
                wait = EXPORT_BACKOFF[min(attempts, len(EXPORT_BACKOFF) - 1)]
                self._export_backoff[job_id] = (attempts + 1, now + wait)
                await self.store.jobs.set_export_pending(job_id, True, str(exc))
                log.warning(
                    "job %s: export failed again, next try in %.0f s: %s", job_id, wait, exc
                )
            else:
                self._export_backoff.pop(job_id, None)
                await self.store.jobs.set_export_pending(job_id, False, None)
            finally:
                await self.store.jobs.release_lease(job_id, self.owner)

    async def export_again(self, job_id: str, principal: Principal) -> dict[str, Any]:
        """``POST /v1/jobs/{id}/export``: write a finished job's export now."""
        job = await self.job(job_id, principal)
        if job.status not in EXPORTED:
            raise JobConflict(
                f"job {job_id} is {job.status}: only a finished job ({', '.join(EXPORTED)}) "
                "has an export"
            )
        await self.export_or_retry_later(job_id)
        return await self.status(job_id, principal)

    async def ready(self) -> bool:
        """Whether this replica can serve: its database answers and its broker is up."""
        from airoboros.worker import dependencies_ready

        return await dependencies_ready(self.store, self.bus)

    async def export(self, job_id: str) -> DatasetExported:
        """Write the dataset to the object store (JSONL in the original format, one file
        per category, then a manifest, last, that names them) and announce it. Rows
        marked bad are left out (``RowRepository.iterate``)."""
        per_cat: dict[str, list[bytes]] = defaultdict(list)
        all_lines: list[bytes] = []
        async for it in self.store.rows.iterate(job_id):
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
        await self.store.jobs.set_export(job_id, uri)
        event = DatasetExported(
            job_id=job_id, uri=uri, rows=len(all_lines), files=files, counts=counts
        )
        await self.bus.publish(event)
        log.info("job %s exported: %d rows to %s", job_id, len(all_lines), uri)
        return event

    async def generate_topics(self, raw: Any) -> list[str]:
        cfg, _ = self.review(raw, "request")
        cfg = job_config(
            self.settings, cfg.model_dump(exclude={"openai_api_key"}), api_key=cfg.openai_api_key
        )
        llm = make_llm(cfg)
        try:
            return await generate_topics(cfg, llm)
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
        await self.store.rows.apply_batch(
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
        done = await grant_and_forward(self.store.progress, self.bus.publish, msg)
        if done is not None:
            await self._on_completed(done)

    async def on_deferred(self, msg: CallsDeferred) -> None:
        """(batch lane) Store the calls a command needs answered (any replica may: the
        store is shared); the job's controller sends them as batch jobs."""
        ctl = self.controllers.get(msg.job_id)
        if ctl is not None and not ctl.finished and ctl.lane is not None:
            await ctl.lane.on_deferred(msg)
            return
        await store_deferred(self.store.batches, msg)

    async def on_dead_letter(self, queue: str, body: bytes, headers: dict[str, Any]) -> None:
        try:
            data = json.loads(body)
        except ValueError:
            data = {}
        await self.store.dead_letters.add(
            queue=queue,
            body=body.decode(errors="replace")[:100_000],
            job_id=data.get("job_id") if isinstance(data, dict) else None,
            message_id=data.get("message_id") if isinstance(data, dict) else None,
            kind=data.get("kind") if isinstance(data, dict) else None,
            reason=_text(headers.get("x-dead-letter-reason")),
        )
        log.warning("dead-lettered message from %s recorded", queue)

    # --- the loop that keeps jobs moving ----------------------------------------------------
    async def tick_all(self) -> None:
        for job_id in await self.store.jobs.running():
            ctl = self.controllers.get(job_id)
            if ctl is None:
                await self._take(job_id)  # new, or orphaned by a replica that died
                continue
            if not await self.store.jobs.try_lease(job_id, self.owner, self.settings.lease_seconds):
                if self.controllers.get(job_id) is ctl:
                    self.controllers.pop(job_id)  # lost the lease (we were too slow)
                if ctl.lane is not None:  # its batch jobs are the new holder's now
                    await ctl.lane.stop(cancel_open=False)
                continue
            await ctl.tick()
            if not ctl.finished:
                await self.post(job_id, "running")  # a Redis that lost it has it again
        for job_id, ctl in list(self.controllers.items()):
            if not ctl.finished:
                continue
            async with self._job_lock(job_id):
                if self.controllers.get(job_id) is not ctl:
                    continue  # resumed meanwhile: a new run holds the job
                self.controllers.pop(job_id)
                await self.post(job_id, ctl.outcome.status if ctl.outcome else "failed")
                await self.store.jobs.release_lease(job_id, self.owner)
        await self.retry_exports()

    async def run_ticks(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick_all()
            except Exception:
                log.exception("controller tick failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.settings.tick_interval)
