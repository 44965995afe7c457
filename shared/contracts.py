"""Every message of the pipeline, versioned, each with a ``message_id`` for idempotency.

Commands are imperative (``GenerateBatch``), events past tense (``BatchCompleted``).
The flow (see docs/architecture.md):

    topics --GenerateBatch--> generator --CandidatesProposed--> dedupe
    dedupe --CandidatesScreened--> topics (reserves room in the count)
    topics --RespondToCandidates--> generator --BatchCompleted--> topics
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: "MAJOR.MINOR" of the messages this release writes. A MINOR step only adds optional
#: fields, which readers of the same MAJOR ignore (tolerant readers); a MAJOR step changes
#: meaning, and a bus refuses (dead-letters) a message whose MAJOR it does not know.
SCHEMA_VERSION = "1.2"


def new_id() -> str:
    return uuid.uuid4().hex


class Message(BaseModel):
    """Base of every bus message.

    Readers are tolerant: fields this release does not know are ignored (a newer
    producer's additions, during a rolling upgrade), so adding an optional field is a
    MINOR step of ``schema_version``. ``schema_version`` is "MAJOR.MINOR"; the integer of
    earlier releases (``1``) is read as "1.0". Which MAJOR a consumer accepts is the bus's
    business (``airoboros.bus.decode``), not the model's: a message of an unknown MAJOR
    still parses here, so that it can be dead-lettered with the reason. The models that
    travel inside messages (``Item``, ``Candidate``, ``Artifact``, ``BatchStats``) are read
    the same way.
    """

    model_config = ConfigDict(extra="ignore")
    #: bus topic this message type travels on
    topic: ClassVar[str] = ""

    schema_version: str = SCHEMA_VERSION
    message_id: str = Field(default_factory=new_id)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    #: W3C trace context, carried across hops
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("schema_version", mode="before")
    @classmethod
    def _major_minor(cls, value: object) -> str:
        major, minor = cls.version_parts(value)
        return f"{major}.{minor}"

    @staticmethod
    def version_parts(value: object) -> tuple[int, int]:
        """(MAJOR, MINOR) of a ``schema_version`` as found on the wire: "MAJOR.MINOR", or
        an integer MAJOR (minor 0) as earlier releases wrote it. Raises ValueError."""
        if isinstance(value, int) and not isinstance(value, bool):
            major, minor = value, 0
        elif isinstance(value, str) and value.count(".") == 1:
            head, tail = value.split(".")
            if not (head.isascii() and head.isdigit() and tail.isascii() and tail.isdigit()):
                raise ValueError(f"schema_version {value!r} is not MAJOR.MINOR")
            major, minor = int(head), int(tail)
        else:
            raise ValueError(f"schema_version {value!r} is not MAJOR.MINOR")
        if major < 0:
            raise ValueError(f"schema_version {value!r} is not MAJOR.MINOR")
        return major, minor

    def partition_key(self) -> str | None:
        """Messages with the same key are handled one at a time where the bus partitions
        this topic (see ``Bus``); None: any consumer, any order."""
        return None


class Item(BaseModel):
    """One dataset row, in the original's output format."""

    model_config = ConfigDict(extra="ignore")

    instruction: str
    response: str
    category: str
    system: str | None = None
    skip_prompt_formatting: bool = False
    #: whether the row counts toward its category's ``count`` (internal, never written):
    #: an rp chat or a gtkm transcript is one unit of ``count`` spread over several rows,
    #: and an uncounted row shares the fate of the counted row before it in its batch
    counted: bool = True
    #: tokens paid to make this row (internal, never written): lost if it is dropped
    cost_tokens: float = 0.0

    def to_row(self) -> dict[str, Any]:
        """The original JSONL shape: optional keys only when set; text stripped."""
        row: dict[str, Any] = {
            "instruction": self.instruction.strip(),
            "response": self.response.strip(),
            "category": self.category,
        }
        if self.system is not None:
            row["system"] = self.system.strip()
        if self.skip_prompt_formatting:
            row["skip_prompt_formatting"] = True
        return row


class Candidate(BaseModel):
    """An instruction proposed by step 1, before dedupe (and before its response,
    for two-step instructors)."""

    model_config = ConfigDict(extra="ignore")

    candidate_id: str = Field(default_factory=new_id)
    instruction: str
    #: text that dedupe embeds; defaults to the instruction
    dedupe_text: str | None = None
    response: str | None = None
    system: str | None = None
    skip_prompt_formatting: bool = False
    #: instructor-private state carried to the response step (e.g. PLAINFORMAT)
    meta: dict[str, Any] = Field(default_factory=dict)
    #: the most rows (or artifacts) toward ``count`` that its response step can make: the
    #: controller reserves that much room in the count before the step is paid for
    counts: int = Field(default=1, ge=0)
    #: its share of the tokens paid for step 1: lost if it is dropped
    cost_tokens: float = 0.0

    def text_for_dedupe(self) -> str:
        return self.dedupe_text if self.dedupe_text is not None else self.instruction


class Artifact(BaseModel):
    """Something a job makes that is not a dataset row but later phases use (a character
    card). Unique per job by (kind, name), case-insensitively."""

    model_config = ConfigDict(extra="ignore")

    kind: str
    name: str
    data: dict[str, Any] = Field(default_factory=dict)


class BatchStats(BaseModel):
    """What happened to one batch's items on the way (each item lost is counted once, by
    its cause), and what its calls cost."""

    model_config = ConfigDict(extra="ignore")

    #: items asked for (the batch size sent)
    asked: int = 0
    #: usable candidates after per-item filtering (what dedupe screens)
    proposed: int = 0
    duplicates: int = 0
    #: items dropped by response_filters or the instructor's own checks
    filtered: int = 0
    #: items (or single answers) that were refusals
    refused: int = 0
    #: replies in which no item could be parsed
    unparseable: int = 0
    #: replies cut off by the token limit (their complete items are kept)
    truncated: int = 0
    #: calls that failed after their retries
    failures: int = 0
    #: accepted candidates not answered because the count had no room for them
    withheld: int = 0
    #: retried attempts of this batch's calls (429, 5xx, timeouts)
    retries: int = 0
    #: usage of this batch's calls, persisted with its rows
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0

    #: the start of the last answer, kept so that a category that cannot progress can
    #: say what the endpoint sent
    excerpt: str | None = None
    #: tokens of this batch that bought no kept row: calls whose answer was unusable, and
    #: the share of a reply's tokens that went to items lost on the way
    lost_tokens: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class JobSettings(BaseModel):
    """What a worker needs to run one instructor of a job, carried in its commands so
    that generator workers need no database: the job's config as the server's policy
    approved it, reduced to that instructor, without credentials."""

    #: ``Config.model_dump(mode="json")`` with only this instructor under ``instructors``
    #: (a job's own API key is on the job board, airoboros.jobboard, never in a message)
    config: dict[str, Any]
    #: tokens and cost the job had spent when the command was sent (the shared budget
    #: starts from there when a replica first sees the job)
    spent_tokens: int = 0
    spent_cost: float = 0.0


class BatchAnswer(BaseModel):
    """(batch lane) The answer of one call that went through the Batch API: its text and
    usage, or why it failed for good (``error``: its attempts are spent)."""

    model_config = ConfigDict(extra="ignore")
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: USD, at the batch price
    cost: float = 0.0
    error: str | None = None


class DeferredCall(BaseModel):
    """(batch lane) One call a command needs answered before it can finish: the body of
    a chat completion request, keyed by ``airoboros.llm.batch.call_key``."""

    model_config = ConfigDict(extra="ignore")
    key: str
    body: dict[str, Any]


class GenerateBatch(Message):
    """Command: produce one batch for one instructor."""

    topic: ClassVar[str] = "generation.batch"
    kind: Literal["generate_batch"] = "generate_batch"
    job_id: str
    task_id: str = Field(default_factory=new_id)
    instructor: str
    batch_size: int
    #: topics injected into this batch's prompt (empty for instructors without topics)
    topics: list[str] = Field(default_factory=list)
    #: how many rows the instructor still needs; instructors may use it to size work
    remaining: int
    #: material the controller chose for this batch (source rows, cards, passages); its
    #: kind is declared in the instructor's catalog spec (airoboros.topics.inputs)
    inputs: list[dict[str, Any]] = Field(default_factory=list)
    #: the job's settings for this instructor (None: the worker has them, as embedded)
    settings: JobSettings | None = None
    #: (batch lane) answers of this command's calls from the Batch API, by call key
    #: (airoboros.llm.batch.call_key): replayed instead of calling the endpoint
    answers: dict[str, BatchAnswer] = Field(default_factory=dict)


class CandidatesProposed(Message):
    """Event: step 1 proposed these candidates; dedupe must screen them."""

    topic: ClassVar[str] = "dedupe.screen"
    kind: Literal["candidates_proposed"] = "candidates_proposed"
    job_id: str
    task_id: str
    instructor: str
    #: cosine similarity at or above which a candidate is a duplicate
    threshold: float
    candidates: list[Candidate]
    #: dedupe index to screen against; None: the job's dataset index (``job_id``)
    namespace: str | None = None
    stats: BatchStats = Field(default_factory=BatchStats)
    #: carried on to the response step (see ``GenerateBatch.settings``)
    settings: JobSettings | None = None

    def partition_key(self) -> str | None:
        # Dedupe of one dataset must see every candidate of that dataset in order.
        return self.job_id


class CandidatesScreened(Message):
    """Event: dedupe accepted these candidates (and reserved them in the index). The
    controller reserves room in the count for them and passes on those that fit."""

    topic: ClassVar[str] = "dedupe.screened"
    kind: Literal["candidates_screened"] = "candidates_screened"
    job_id: str
    task_id: str
    instructor: str
    accepted: list[Candidate]
    stats: BatchStats
    #: carried on to the response step (see ``GenerateBatch.settings``)
    settings: JobSettings | None = None


class RespondToCandidates(Message):
    """Command: make the responses (step 2) of these candidates, for which room in the
    count is reserved; no more than that is paid for."""

    topic: ClassVar[str] = "generation.respond"
    kind: Literal["respond_to_candidates"] = "respond_to_candidates"
    job_id: str
    task_id: str
    instructor: str
    candidates: list[Candidate]
    stats: BatchStats
    settings: JobSettings | None = None
    #: (batch lane) see ``GenerateBatch.answers``
    answers: dict[str, BatchAnswer] = Field(default_factory=dict)


class BatchCompleted(Message):
    """Event: a batch is finished; ``items`` are the rows it produced (possibly none)."""

    topic: ClassVar[str] = "generation.completed"
    kind: Literal["batch_completed"] = "batch_completed"
    job_id: str
    task_id: str
    instructor: str
    items: list[Item] = Field(default_factory=list)
    #: non-row products (character cards); they count toward the instructor's target
    artifacts: list[Artifact] = Field(default_factory=list)
    stats: BatchStats = Field(default_factory=BatchStats)
    #: set when the batch failed as a whole (an error code from airoboros.errors)
    error: str | None = None
    error_message: str | None = None


class CallsDeferred(Message):
    """Event (batch lane): a command of a batch instructor was run against the answers it
    carried and needs these calls answered first. The controller sends them through the
    Batch API and sends ``command`` again with every answer attached."""

    topic: ClassVar[str] = "generation.deferred"
    kind: Literal["calls_deferred"] = "calls_deferred"
    job_id: str
    task_id: str
    instructor: str
    #: ``GenerateBatch`` or ``RespondToCandidates`` as JSON (its ``answers`` included)
    command: dict[str, Any]
    calls: list[DeferredCall]


class JobEvent(Message):
    """Event: a job changed state (running, done, incomplete: a category could not
    progress, budget_exhausted, failed, cancelled)."""

    topic: ClassVar[str] = "jobs.events"
    kind: Literal["job_event"] = "job_event"
    job_id: str
    status: Literal["running", "done", "incomplete", "budget_exhausted", "failed", "cancelled"]
    detail: str | None = None


class DatasetExported(Message):
    """Event: a finished job's dataset is in the object store."""

    topic: ClassVar[str] = "dataset.exported"
    kind: Literal["dataset_exported"] = "dataset_exported"
    job_id: str
    uri: str
    rows: int
    #: object URI per category file
    files: dict[str, str] = Field(default_factory=dict)
    counts: dict[str, int] = Field(default_factory=dict)


class AdapterPublished(Message):
    """Event: an expert's LoRA adapter is in the object store, in the LMoE layout
    (``<uri>/adapter_config.json``, ``adapter_model.safetensors``, ``description.txt``;
    ``routing_uri`` the expert's routing samples), and registered."""

    topic: ClassVar[str] = "adapter.published"
    kind: Literal["adapter_published"] = "adapter_published"
    expert: str
    version: str
    base_model: str
    uri: str
    routing_uri: str
    description: str = ""
    #: the job whose dataset trained it, when it came from one
    job_id: str | None = None
    dataset_uri: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
