"""Table definitions. Schema changes go through an Alembic migration in
airoboros/migrations/versions, never through create_all."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(32), default="running")
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    config: Mapped[str] = mapped_column(Text, default="{}")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    #: which controller drives the job, until when (topics replicas share jobs this way)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    export_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: W3C trace context (JSON headers) of the request that created the job
    trace_context: Mapped[str | None] = mapped_column(Text, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: a digest of the API key that created the job (None: made before owners existed)
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    #: the job's own key for its LLM endpoint (never returned by the API)
    llm_api_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: the job has ended and its export has yet to be written (retried while it fails)
    export_pending: Mapped[bool] = mapped_column(Boolean, default=False)
    export_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: why the budget stopped a batch (the meter refused a call), until a resume
    budget_note: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=_now, onupdate=_now
    )


class Upload(Base):
    """Documents posted to ``POST /v1/documents``: the files are in the object store under
    ``uploads/<id>/``, a job names the upload by its id."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    #: JSON list of {"name", "bytes"}
    files: Mapped[str] = mapped_column(Text, default="[]")
    bytes: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class InstructorProgress(Base):
    __tablename__ = "instructor_stats"

    job_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    instructor: Mapped[str] = mapped_column(String(64), primary_key=True)
    target: Mapped[int] = mapped_column(Integer, default=0)
    accepted: Mapped[int] = mapped_column(Integer, default=0)
    duplicates: Mapped[int] = mapped_column(Integer, default=0)
    filtered: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost: Mapped[float] = mapped_column(Float, default=0.0)
    batches: Mapped[int] = mapped_column(Integer, default=0)
    rows_from_batches: Mapped[int] = mapped_column(Integer, default=0)
    dropped: Mapped[int] = mapped_column(Integer, default=0)
    refused: Mapped[int] = mapped_column(Integer, default=0)
    unparseable: Mapped[int] = mapped_column(Integer, default=0)
    truncated: Mapped[int] = mapped_column(Integer, default=0)
    withheld: Mapped[int] = mapped_column(Integer, default=0)
    retries: Mapped[int] = mapped_column(Integer, default=0)
    asked: Mapped[int] = mapped_column(Integer, default=0)
    #: candidates step 1 proposed (usable items, what dedupe screened); migration 0011
    proposed: Mapped[int] = mapped_column(Integer, default=0)
    #: consecutive batches without a usable item / with duplicates only (reset on resume)
    fail_streak: Mapped[int] = mapped_column(Integer, default=0)
    dup_streak: Mapped[int] = mapped_column(Integer, default=0)
    wasted_tokens: Mapped[float] = mapped_column(Float, default=0.0)
    last_failure: Mapped[str | None] = mapped_column(Text, nullable=True)
    skipped: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: places dealt from the instructor's deck of material (documents' passages)
    cursor: Mapped[int] = mapped_column(Integer, default=0)


class Row(Base):
    __tablename__ = "items"
    __table_args__ = (UniqueConstraint("job_id", "source_id", name="uq_items_job_source"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    category: Mapped[str] = mapped_column(String(64), index=True)
    instruction: Mapped[str] = mapped_column(Text)
    response: Mapped[str] = mapped_column(Text)
    system: Mapped[str | None] = mapped_column(Text, nullable=True)
    skip_prompt_formatting: Mapped[bool] = mapped_column(Boolean, default=False)
    #: counts toward the category's target (an rp chat counts once, on its first row)
    counted: Mapped[bool] = mapped_column(Boolean, default=True)
    #: marked bad by a person (the console): kept and listed, left out of exports and
    #: culls until unmarked; migration 0012
    bad: Mapped[bool] = mapped_column(Boolean, default=False)
    #: idempotency key: "<message_id>:<index>" of the message that produced the row
    source_id: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Task(Base):
    """A GenerateBatch in flight; lets a restarted controller know what is outstanding."""

    __tablename__ = "tasks"

    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    instructor: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="in_flight")  # in_flight|done|expired
    #: items the batch asks for
    asked: Mapped[int] = mapped_column(Integer, default=0)
    #: room in the count held for its response step; None until it is screened
    reserved: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ProcessedMessage(Base):
    """Message ids whose effects are committed: a redelivery finds its id and does nothing."""

    __tablename__ = "processed_messages"

    message_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class DedupeVector(Base):
    """Every instruction dedupe accepted, as its embedding: the durable side of the index."""

    __tablename__ = "dedupe_vectors"
    __table_args__ = (UniqueConstraint("job_id", "key", name="uq_dedupe_job_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    key: Mapped[str] = mapped_column(String(64))
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class DeadLetterRow(Base):
    """A message that failed every delivery, kept so the job's status can show it."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    queue: Mapped[str] = mapped_column(String(255))
    message_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    kind: Mapped[str | None] = mapped_column(String(64), nullable=True)
    body: Mapped[str] = mapped_column(Text)
    #: why the bus gave up on it (schema MAJOR unknown, not its type, delivery limit)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ArtifactRow(Base):
    """A job's non-row product (a character card), unique by (kind, lower-cased name)."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "kind", "name_key", name="uq_artifacts_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(255))
    name_key: Mapped[str] = mapped_column(String(255))
    data: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class AdapterRecord(Base):
    """The adapter registry: one row per trained expert version."""

    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("expert", "version", name="uq_adapters_expert_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    expert: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[str] = mapped_column(String(64))
    base_model: Mapped[str] = mapped_column(Text)
    #: training | published | failed
    status: Mapped[str] = mapped_column(String(16), default="training")
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    dataset_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    metrics: Mapped[str] = mapped_column(Text, default="{}")
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=_now, onupdate=_now
    )


class BatchCall(Base):
    """(batch lane) One call that goes through the Batch API, by its key (the
    ``custom_id`` of its line): pending, submitted (in ``submission_id``), answered, or
    failed for good (``answer`` holds the error)."""

    __tablename__ = "batch_calls"

    job_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    instructor: Mapped[str] = mapped_column(String(64))
    #: the task whose command asked it first (its cost is in the task's stats once done)
    task_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    body: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    #: USD its answer cost (at the batch price)
    cost: Mapped[float] = mapped_column(Float, default=0.0)
    #: tokens its answer used (prompt and completion)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    submission_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    #: ``BatchAnswer`` as JSON, once answered or failed for good
    answer: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class BatchCommand(Base):
    """(batch lane) A command waiting for the answers of its calls (``keys``), sent
    again with them once every one is answered or failed for good."""

    __tablename__ = "batch_commands"

    job_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    #: the ``message_id`` of the command that was deferred (a redelivery is one command)
    command_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    task_id: Mapped[str] = mapped_column(String(64), index=True)
    instructor: Mapped[str] = mapped_column(String(64))
    command: Mapped[str] = mapped_column(Text)
    keys: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default="waiting")  # waiting|dispatched
    seq: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class BatchSubmission(Base):
    """(batch lane) One batch job: recorded before its input file is uploaded and before
    it is created, so a restart finds it (by ``id`` in the job's metadata) instead of
    creating it again. state: submitting | open | completed | failed | expired |
    cancelled (the Batch API's, once it answered) | applied (results stored)."""

    __tablename__ = "batch_submissions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    instructor: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="submitting")
    batch_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    input_file_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    output_file_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    #: the most its calls can cost (held against max_cost while it is open)
    reserved_cost: Mapped[float] = mapped_column(Float, default=0.0)
    #: the most tokens its calls can use (held against max_tokens while it is open)
    reserved_tokens: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=_now, onupdate=_now
    )
