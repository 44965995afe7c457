"""One job lifecycle, for the CLI and the services alike.

``airoboros generate-instructions`` (the embedded composition in airoboros.cli) and the
topics service run a job through the same use cases here: plan it, resolve its topics,
adopt and keep its character cards, write the usage no batch carries, and open its
controller (batch inputs, counting, finishing). They differ only in the adapters they pass:

======================  ===============================  ==================================
what                    embedded (CLI)                   services (topics)
======================  ===============================  ==================================
store                   SQLite beside the output         PostgreSQL
bus (``publish``)       in-process                       RabbitMQ
generated topics        ``FileTopics``: topics_path      ``ObjectTopics``: an object
character cards         ``CardShelf``: a local folder    ``CardShelf``: S3, under the job
rows as committed       ``JsonlSink``: output_path       none (exported when the job ends)
======================  ===============================  ==================================

All of a job's state is in the store: counters, streaks, tasks in flight with the room they
hold, the cursor of the documents deck, a budget stop, the cancel flag. Opening a job again
(a rerun, a restart, another replica taking it over) derives everything from there.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from airoboros.cards import CARD_KIND, card_file_name, card_json, parse_card_file
from airoboros.catalog import CATALOG, PHASES, known_instructors
from airoboros.config import Config, InstructorConfig
from airoboros.contracts import Artifact, Message
from airoboros.errors import ConfigError
from airoboros.llm import LLMClient, UsageMeter
from airoboros.llm.accounting import Usage
from airoboros.llm.batch import BatchClient
from airoboros.ports import ObjectStore
from airoboros.store import ArtifactRepository, ProgressRepository, Store, StoredItem
from airoboros.topics.batches import BatchLane
from airoboros.topics.controller import JobController, JobOutcome
from airoboros.topics.topics import TopicPicker, TopicsSource, instructor_topics, resolve_topics

log = logging.getLogger(__name__)

Publish = Callable[[Message], Awaitable[None]]


# --- the plan ---------------------------------------------------------------------------


@dataclass
class JobPlan:
    """What a job will run: its instructors in phase order, their targets, what it skips."""

    job_id: str
    active: list[str]
    #: categories in the config that this version does not generate, with the reason
    skipped: dict[str, str]
    targets: dict[str, int]
    warnings: list[str] = field(default_factory=list)
    #: the phase each active instructor runs in (main, editor, cards, characters)
    phases: dict[str, str] = field(default_factory=dict)


def make_plan(config: Config, job_id: str) -> JobPlan:
    """The plan of ``config``. Categories another one needs (cards for rp) are added to
    the config with defaults when it lacks them (the original required the section)."""
    known = known_instructors()
    active, skipped, warnings = [], {}, []
    for name in list(config.instructors):
        for needed in CATALOG[name].implies if name in CATALOG else ():
            if needed not in config.instructors:
                config.instructors[needed] = InstructorConfig()
                warnings.append(f"{name} needs {needed}, which the config lacks: using defaults")
    for name in config.instructors:
        if name in known:
            active.append(name)
        else:
            skipped[name] = "unknown category"
    if config.unknown_keys:
        warnings.append("unknown top-level keys ignored: " + ", ".join(config.unknown_keys))
    if any(getattr(config, k) for k in ("vertexai_credentials_path", "vertexai_project_id")):
        warnings.append(
            "vertexai_* keys are ignored: point base_url at an OpenAI-compatible endpoint instead"
        )
    phases = {n: CATALOG[n].phase for n in active}
    active.sort(key=lambda n: PHASES.index(phases[n]))  # stable: config order within a phase
    targets = {n: config.count_for(n) for n in active}
    return JobPlan(job_id, active, skipped, targets, warnings, phases)


# --- topics -----------------------------------------------------------------------------


async def job_topics(
    config: Config, source: TopicsSource, llm: LLMClient, *, remaining: list[str]
) -> list[str]:
    """The job's global topics (``resolve_topics``), asked only when an instructor still
    short of its count takes topics and has no topics_path of its own."""
    if any(CATALOG[n].uses_topics and not config.instructors[n].topics_path for n in remaining):
        return await resolve_topics(config, llm, source)
    return []


def topic_pickers(
    config: Config, plan: JobPlan, topics: list[str], rng: random.Random
) -> dict[str, TopicPicker | None]:
    """A picker per instructor that takes topics: its own topics_path, else the job's."""
    pickers: dict[str, TopicPicker | None] = {}
    for name in plan.active:
        s = CATALOG[name]
        pickers[name] = None
        if s.uses_topics:
            own = instructor_topics(config, name, topics)
            pickers[name] = TopicPicker(own, s.topic_mode, random.Random(rng.random()))
    return pickers


# --- cards and usage --------------------------------------------------------------------


class CardShelf:
    """Where a job's character cards are kept outside the store, one file each in the
    original's format (airoboros.cards): a local folder embedded, the object store on the
    services. Cards found there are adopted (and count toward the target); every new card
    is put there."""

    def __init__(self, objects: ObjectStore, prefix: str = "") -> None:
        self.objects = objects
        self.prefix = prefix

    async def _shelved(self) -> dict[str, Artifact]:
        """The cards on the shelf, by key."""
        out = {}
        for key in await self.objects.list(self.prefix):
            if key.endswith(".json"):
                card = parse_card_file(await self.objects.get_bytes(key))
                if card is not None:
                    out[key] = card
        return out

    async def adopt(self, artifacts: ArtifactRepository, job_id: str) -> int:
        cards = list((await self._shelved()).values())
        return await artifacts.add(job_id, cards, count_as=CARD_KIND) if cards else 0

    async def save(self, cards: list[Artifact]) -> None:
        shelved = await self._shelved()
        names = {c.name.lower() for c in shelved.values()}
        for card in cards:
            key = f"{self.prefix}{card_file_name(card)}"
            if card.name.lower() not in names and key not in shelved:
                await self.objects.put_bytes(key, card_json(card).encode())


async def preload_usage(progress: ProgressRepository, job_id: str, meter: UsageMeter) -> None:
    """Start ``meter`` from the usage the store has for the job: budgets span reruns."""
    for name, s in (await progress.stats(job_id)).items():
        meter.preload(name, Usage(s.requests, s.prompt_tokens, s.completion_tokens, s.cost))


async def record_usage(progress: ProgressRepository, job_id: str, meter: UsageMeter) -> None:
    """Write to the store whatever usage ``meter`` has that the store lacks: topic
    generation, cull judging, and calls of batches that never completed. Batches carry
    their own usage (applied with their rows); this is the one way everything else is
    written, so budgets span reruns."""
    stats = await progress.stats(job_id)
    for name, u in meter.by_instructor.items():
        s = stats.get(name)
        have = (s.requests, s.prompt_tokens, s.completion_tokens, s.cost) if s else (0, 0, 0, 0.0)
        delta = {
            "requests": u.requests - have[0],
            "prompt_tokens": u.prompt_tokens - have[1],
            "completion_tokens": u.completion_tokens - have[2],
            "cost": u.cost - have[3],
        }
        positive = {k: v for k, v in delta.items() if v > 1e-12}
        if positive:
            await progress.add_stats(job_id, name, **positive)


# --- opening a job ----------------------------------------------------------------------


@dataclass
class JobAdapters:
    """What differs between the embedded run and the services (see the module's table)."""

    store: Store
    publish: Publish
    topics: TopicsSource
    #: None when the job makes no cards
    cards: CardShelf | None = None
    #: rows as they are committed, in store order (the embedded JSONL)
    on_rows: Callable[[list[StoredItem]], None] | None = None
    #: the job's end, before its status is written (the services' export)
    on_finish: Callable[[JobOutcome], Awaitable[None]] | None = None
    #: seconds after which a task whose message was lost is replaced (None: from config)
    task_timeout: float | None = None
    trace_context: dict[str, str] | None = None
    #: (batch lane) commands already sent died with the last process (in-process bus):
    #: send the latest of each unfinished task again on opening
    revive_batches: bool = False


async def open_job(
    job_id: str,
    config: Config,
    adapters: JobAdapters,
    llm: LLMClient,
    *,
    rng: random.Random,
) -> tuple[JobPlan, JobController]:
    """Plan a job, resolve its topics (paid calls, recorded as usage), adopt its cards,
    and make its controller, ready to ``start``. The job must exist in the store."""
    store = adapters.store
    plan = make_plan(config, job_id)
    if not plan.active:
        raise ConfigError(["instructors: none of the listed categories can be generated"])
    stats = await store.progress.stats(job_id)
    remaining = [
        n for n in plan.active if (stats[n].accepted if n in stats else 0) < plan.targets[n]
    ]
    try:
        topics = await job_topics(config, adapters.topics, llm, remaining=remaining)
    finally:
        await record_usage(store.progress, job_id, llm.meter)
    pickers = topic_pickers(config, plan, topics, rng)

    on_artifacts = None
    if adapters.cards is not None and "character" in plan.active:
        adopted = await adapters.cards.adopt(store.artifacts, job_id)
        if adopted:
            log.info("job %s: adopted %d character cards", job_id, adopted)
        on_artifacts = adapters.cards.save
    controller = JobController(
        job_id,
        config,
        adapters.publish,
        jobs=store.jobs,
        progress=store.progress,
        rows=store.rows,
        artifacts=store.artifacts,
        active=plan.active,
        pickers=pickers,
        on_rows=adapters.on_rows,
        on_finish=adapters.on_finish,
        task_timeout=adapters.task_timeout,
        seed=rng.randrange(2**31),
        on_artifacts=on_artifacts,
        trace_context=adapters.trace_context,
    )
    if any(config.batch_for(n) for n in plan.active):
        controller.lane = await open_batch_lane(job_id, config, adapters)
    return plan, controller


async def open_batch_lane(job_id: str, config: Config, adapters: JobAdapters) -> BatchLane:
    """(batch lane) The job's batch jobs, picked up where the store has them: tasks
    waiting for answers stay in flight (and, in one process, commands sent before a
    crash are sent again)."""
    store = adapters.store
    if adapters.revive_batches:
        revived = await store.batches.revive(job_id)
        if revived:
            log.info("job %s: %d commands waiting for batch answers resumed", job_id, revived)
    await store.batches.keep_alive(job_id, await store.batches.waiting_tasks(job_id))
    return BatchLane(
        job_id,
        config,
        batches=store.batches,
        progress=store.progress,
        publish=adapters.publish,
        client=BatchClient.for_config(config),
    )
