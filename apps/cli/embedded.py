"""The in-process composition: every service of the pipeline in one process, on the
embedded adapters (the in-process bus, SQLite, a local folder, faiss).

This is ``airoboros generate-instructions``. The job runs through the same lifecycle as on
the services (airoboros.topics.lifecycle) with the same controller, generator and dedupe
classes; only the adapters passed here differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airoboros.bus import InMemoryBus
from airoboros.config import Config
from airoboros.contracts import (
    BatchCompleted,
    CandidatesProposed,
    CandidatesScreened,
    GenerateBatch,
    Item,
    JobEvent,
    RespondToCandidates,
)
from airoboros.errors import ConfigError, MissingCredentials
from airoboros.llm import LLMClient
from airoboros.llm.accounting import Usage
from airoboros.llm.factory import make_llm
from airoboros.objects import LocalObjectStore
from airoboros.ports import Embedder
from airoboros.store import Store, make_store
from airoboros.topics.lifecycle import (
    CardShelf,
    JobAdapters,
    JobPlan,
    make_plan,
    open_job,
    preload_usage,
    record_usage,
)
from airoboros.topics.sink import JsonlSink
from airoboros.topics.topics import FileTopics

if TYPE_CHECKING:
    from airoboros.dedupe.service import Deduper
    from airoboros.protocol import JobReport
    from airoboros.topics.controller import JobController, JobOutcome

log = logging.getLogger(__name__)


def job_id_for(config: Config) -> str:
    """Embedded runs are keyed by their output file, so a rerun finds its own job."""
    out = str(Path(config.output_path).resolve())
    return "local-" + hashlib.sha1(out.encode()).hexdigest()[:16]


def plan_for(config: Config) -> JobPlan:
    """The plan of an embedded run: its job is keyed by its output file."""
    return make_plan(config, job_id_for(config))


def check_credentials(config: Config) -> None:
    if not config.resolved_api_key() and not config.resolved_base_url():
        raise MissingCredentials()


async def _log_event(event: JobEvent) -> None:
    log.debug("job %s: %s %s", event.job_id, event.status, event.detail or "")


@dataclass
class RunResult:
    plan: JobPlan
    #: the JSONL the rows went to
    output_path: Path
    status: str
    detail: str | None
    states: dict[str, Any]
    usage: Usage
    rows: int
    requests_per_minute: float
    #: retried attempts of this run's calls (429, 5xx, timeouts)
    retries: int = 0
    #: the job's quality report (airoboros.report), and the file it was written to
    report: JobReport | None = None
    report_path: Path | None = None


def report_path_for(output_path: str | Path) -> Path:
    """Where an embedded run writes its report: beside the output, named after it
    (``instructions.jsonl`` -> ``instructions.report.json``)."""
    return Path(output_path).with_suffix(".report.json")


def write_report(report: JobReport, path: Path) -> Path | None:
    """Write ``report`` to ``path`` (atomically), unless a file there is not a report of
    the same job: a user's file is never overwritten. Returns the path written, or None."""
    import json

    if path.exists():
        try:
            prior = json.loads(path.read_text())
            ours = isinstance(prior, dict) and prior.get("job_id") == report.job_id
        except (OSError, UnicodeDecodeError, ValueError):
            ours = False
        if not ours:
            log.warning("not writing the report: %s exists and is not this job's report", path)
            return None
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(report.model_dump_json(indent=2) + "\n")
    tmp.replace(path)
    return path


class Generation:
    """One embedded generation job, from config to JSONL."""

    def __init__(
        self,
        config: Config,
        *,
        embedder: Embedder | None = None,
        seed: int | None = None,
        on_progress: Callable[[Generation], None] | None = None,
        progress_interval: float = 0.5,
    ) -> None:
        self.config = config
        self.plan = plan_for(config)
        self._embedder = embedder
        self.seed = seed
        self.on_progress = on_progress
        self.progress_interval = progress_interval
        self.controller: JobController | None = None
        self.llm: LLMClient | None = None

    async def run(self) -> RunResult:
        from airoboros.dedupe.service import DedupeService
        from airoboros.generator.service import GeneratorService, JobRuntime

        cfg, plan = self.config, self.plan
        check_credentials(cfg)
        rng = random.Random(self.seed)
        store = make_store(cfg.resolved_database_url())
        await store.connect()
        llm = self.llm = make_llm(cfg)
        bus = InMemoryBus()
        deduper_ready: asyncio.Future[Deduper] | None = None
        try:
            sink = JsonlSink(cfg.output_path)
            await self._prepare_output(store, sink)
            await store.jobs.ensure(
                plan.job_id, config=cfg.model_dump(mode="json"), targets=plan.targets
            )
            # A rerun (after a stop, a kill, a budget stop, with append or a raised count)
            # starts again from the stored counts; no verdict of an earlier run is kept.
            await store.jobs.resume(plan.job_id)
            await self._import_or_reconcile(store, sink)
            await preload_usage(store.progress, plan.job_id, llm.meter)
            # Batches in flight when an earlier run of this job died died with it.
            await store.progress.expire_tasks(plan.job_id, datetime.now(UTC))

            # The embedding model loads while the first calls are out (topics, step 1):
            # nothing needs it before the first batch reaches dedupe.
            deduper_ready = asyncio.ensure_future(self._deduper(store, llm))
            warning = await llm.preflight(cfg.model)
            if warning:
                plan.warnings.append(warning)

            cards = None
            if "character" in cfg.instructors:
                folder = cfg.instructors["character"].extra("output_dir", "characters")
                cards = CardShelf(LocalObjectStore(str(folder)))
            adapters = JobAdapters(
                store=store,
                publish=bus.publish,
                topics=FileTopics(cfg.topics_path),
                cards=cards,
                on_rows=sink.write,
                # In one process nothing is lost in transit: a task is only late.
                task_timeout=float("inf"),
            )
            _, controller = await open_job(plan.job_id, cfg, adapters, llm, rng=rng)
            self.controller = controller
            runtime = JobRuntime(cfg, llm)

            async def runtime_for(_: Any) -> JobRuntime:
                return runtime

            generator = GeneratorService(runtime_for, bus.publish, seed=rng.randrange(2**31))
            dedupe = DedupeService(deduper_ready, bus.publish)
            # Concurrency per consumer: LLM-bound steps wide, dedupe narrow (CPU-bound).
            bus.subscribe(GenerateBatch, generator.on_generate, concurrency=cfg.max_concurrency)
            bus.subscribe(
                RespondToCandidates, generator.on_respond, concurrency=cfg.max_concurrency
            )
            bus.subscribe(CandidatesProposed, dedupe.on_proposed, concurrency=2)
            bus.subscribe(CandidatesScreened, controller.on_screened, concurrency=1)
            bus.subscribe(BatchCompleted, controller.on_completed, concurrency=1)
            bus.subscribe(JobEvent, _log_event)
            await bus.start()
            await controller.start()
            progress_task = asyncio.create_task(self._progress_loop())
            try:
                outcome = await self._wait(controller, deduper_ready)
            finally:
                progress_task.cancel()
                await asyncio.gather(progress_task, return_exceptions=True)
                await bus.close()
                # Calls of batches cut short at the end were paid for too.
                await record_usage(store.progress, plan.job_id, llm.meter)
            if bus.dead_letters:
                log.error("%d messages failed permanently", len(bus.dead_letters))
            rows = await store.rows.count(plan.job_id)
            report, report_path = await self._report(store)
            return RunResult(
                plan,
                Path(cfg.output_path),
                outcome.status,
                outcome.detail,
                {v.name: v for v in controller.snapshot()},
                llm.meter.total,
                rows,
                controller.requests_per_minute(),
                llm.stats.retries,
                report,
                report_path,
            )
        finally:
            await bus.close()
            await llm.close()
            await store.close()
            if deduper_ready is not None and not deduper_ready.done():
                deduper_ready.cancel()
                await asyncio.gather(deduper_ready, return_exceptions=True)

    async def _report(self, store: Store) -> tuple[JobReport | None, Path | None]:
        """The job's quality report, written beside the output. A report that cannot be
        made or written is logged, never a reason to fail a run whose rows are safe."""
        from airoboros.report import build_report

        try:
            report = await build_report(store, self.plan.job_id)
        except Exception:
            log.exception("could not build the quality report")
            return None, None
        try:
            path = write_report(report, report_path_for(self.config.output_path))
        except OSError as exc:
            log.warning("could not write the quality report: %s", exc)
            path = None
        return report, path

    @staticmethod
    async def _wait(controller: JobController, deduper: asyncio.Future[Deduper]) -> JobOutcome:
        """The job's outcome; if dedupe cannot start (a bad embedding_model), its error."""
        waiter = asyncio.ensure_future(controller.wait())
        either: list[asyncio.Future[Any]] = [waiter, deduper]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if deduper.done() and not deduper.cancelled() and deduper.exception() is not None:
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
            raise deduper.exception()  # type: ignore[misc]
        return await waiter

    async def _deduper(self, store: Store, llm: LLMClient) -> Deduper:
        """The job's dedupe: the embedding model, and the index of the rows it has. The
        model starts loading once the first request is out (or after a moment when there
        is none to send): importing torch in a thread slows the event loop, and the first
        request should not wait for it."""
        from airoboros.dedupe.service import Deduper, dedupe_text
        from airoboros.vectors import FaissVectorStore

        cfg = self.config
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(llm.first_sent.wait(), timeout=3.0)
        from airoboros.embeddings import SentenceTransformerEmbedder

        embedder: Embedder
        if self._embedder is not None:
            embedder = self._embedder
        else:
            embedder = await asyncio.to_thread(
                SentenceTransformerEmbedder,
                cfg.embedding_model,
                cfg.embedding_device,
                dtype=cfg.embedding_dtype,
            )
        deduper = Deduper(embedder, FaissVectorStore(embedder.dim), durable=store.vectors)
        if await store.vectors.count(self.plan.job_id) == 0:
            # Rows without vectors (adopted from an existing output): embed them once.
            ids, texts = [], []
            async for row in store.rows.iterate(self.plan.job_id):
                ids.append(f"row:{row.seq}")
                texts.append(dedupe_text(row.item))
            if texts:
                await deduper.restore(self.plan.job_id, ids, texts)
        return deduper

    async def _progress_loop(self) -> None:
        if self.on_progress is None:
            return
        while True:
            self.on_progress(self)
            await asyncio.sleep(self.progress_interval)

    async def _prepare_output(self, store: Store, sink: JsonlSink) -> None:
        cfg, plan = self.config, self.plan
        out = Path(cfg.output_path)
        exists = await store.jobs.exists(plan.job_id)
        if cfg.overwrite:
            out.unlink(missing_ok=True)
            if exists:
                await store.jobs.delete(plan.job_id)
            return
        if not out.exists() and not exists:
            return
        if cfg.append:
            return
        if exists and (await store.jobs.get(plan.job_id)).status != "done":
            log.info("resuming the unfinished job for %s", out)
            return
        raise ConfigError(
            [
                f"output_path: {out} already exists; set append: true to continue it "
                "or overwrite: true to replace it"
            ]
        )

    async def _import_or_reconcile(self, store: Store, sink: JsonlSink) -> None:
        plan, out = self.plan, Path(self.config.output_path)
        if await store.rows.count(plan.job_id) == 0 and out.exists():
            # An output written by the original tool (or a lost store): adopt its rows.
            rows = sink.read_rows()
            items = []
            for n, row in enumerate(rows, 1):
                fields = {k: row[k] for k in Item.model_fields if row.get(k) is not None}
                fields.setdefault("category", "unknown")
                try:
                    items.append((f"import:{n}", Item.model_validate(fields)))
                except Exception as exc:
                    raise ConfigError(
                        [f"output_path: {out}:{n} is not a dataset row ({exc})"]
                    ) from None
            await store.rows.add(plan.job_id, items, cap=False)
            log.info("imported %d existing rows from %s", len(items), out)
            return
        added = await sink.reconcile(store.rows, plan.job_id)
        if added:
            log.info("restored %d rows to %s that a crash kept from it", added, out)
