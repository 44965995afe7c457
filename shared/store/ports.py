"""The ports of the SQL store: one small Protocol per kind of state, and the records
they speak.

A caller depends on the repository it uses (the job controller on jobs, progress, rows
and artifacts; dedupe on vectors; the trainer on the registry), never on the adapter.
The adapter (``airoboros.store.sql.SqlStore``, one engine for SQLite and PostgreSQL)
composes them as ``Store``. Every method is one transaction: what must be atomic is one
method, even when it writes the tables of another repository (``RowRepository.apply_batch``
writes rows, artifacts, counters, the task and the processed message together).

Shared by every port:

- A method commits before it returns: what it wrote is durable, and any later call (of
  this process or another, on the same database) sees it.
- Methods that name one job and need it raise ``airoboros.errors.NotFoundError`` when it
  does not exist; others say what they do instead. An outage of the database raises the
  driver's error, which ``airoboros.errors.is_unavailable`` recognises.
- Writers of one instructor's count (``RowRepository.add``, ``apply_batch``,
  ``ProgressRepository.grant``, ``advance_cursor``, ``set_skipped``,
  ``ArtifactRepository.add``) are serialised with each other, across connections and
  processes: no check-then-write of one can interleave with another's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from airoboros.contracts import Artifact, BatchAnswer, BatchStats, Item
from airoboros.counting import CategoryCounts

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

#: The usage counters ``ProgressRepository.add_stats`` may add to.
STAT_FIELDS = (
    "duplicates",
    "filtered",
    "failures",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cost",
)


# --- records --------------------------------------------------------------------------------


@dataclass
class JobRecord:
    id: str
    status: str
    detail: str | None
    config: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    cancel_requested: bool = False
    export_uri: str | None = None
    finished_at: datetime | None = None
    #: W3C trace context of the request that created the job ({} when none)
    trace_context: dict[str, str] = field(default_factory=dict)
    #: a digest of the API key that created it (None: only admin keys see it)
    owner: str | None = None
    #: its export is still to be written (the object store was unavailable)
    export_pending: bool = False
    export_error: str | None = None
    #: why the budget stopped a batch of the job (until it is resumed)
    budget_note: str | None = None


#: The counters of one instructor of a job (the name the store's callers know them by).
InstructorStats = CategoryCounts


@dataclass
class Flight:
    """An instructor's batches in flight."""

    #: batches in flight
    batches: int = 0
    #: of which not screened yet, and the items those ask for
    unscreened: int = 0
    pending_items: int = 0
    #: room in the count held by the screened ones
    reserved: int = 0


@dataclass
class StoredItem:
    """A row as stored: its sequence number (increasing in insertion order, per
    database) and its item."""

    seq: int
    item: Item
    #: marked bad (``RowRepository.mark_bad``): left out of the dataset until unmarked
    bad: bool = False


@dataclass
class AdapterInfo:
    expert: str
    version: str
    base_model: str
    status: str
    job_id: str | None
    dataset_uri: str | None
    uri: str | None
    metrics: dict[str, Any]
    detail: str | None
    created_at: datetime


# --- the ports ------------------------------------------------------------------------------


class JobRepository(Protocol):
    """Jobs: their config, status, cancel flag, lease, export flags and own LLM key.

    A job is created with each instructor's target (its progress row); everything else
    of its progress is ``ProgressRepository``'s.
    """

    async def ensure(
        self,
        job_id: str,
        *,
        config: dict[str, Any],
        targets: dict[str, int],
        trace_context: dict[str, str] | None = None,
        owner: str | None = None,
        llm_api_key: str | None = None,
    ) -> JobRecord:
        """Create the job (status ``running``) if it is new, else replace its config
        (status, owner, trace and key are kept); in the same transaction set each named
        instructor's target, creating its counters at zero. Idempotent. ``llm_api_key`` is
        the job's own key for its endpoint: kept apart from the config, returned only by
        ``llm_api_key``. Returns the job."""
        ...

    async def get(self, job_id: str) -> JobRecord:
        """The job. Raises NotFoundError."""
        ...

    async def exists(self, job_id: str) -> bool: ...

    async def recent(self, *, limit: int = 100, owner: str | None = None) -> list[JobRecord]:
        """The newest jobs first, at most ``limit``; with ``owner``, only that owner's."""
        ...

    async def running(self) -> list[str]:
        """The ids of the jobs whose status is ``running``."""
        ...

    async def set_status(self, job_id: str, status: str, detail: str | None = None) -> None:
        """Set the status and its detail; ``finished_at`` is now unless the status is
        ``running`` (then None). A job that does not exist is left alone."""
        ...

    async def request_cancel(self, job_id: str) -> None:
        """Set the cancel flag (the status is the controller's to change). Idempotent.
        Raises NotFoundError."""
        ...

    async def resume(self, job_id: str) -> JobRecord:
        """Start a stopped (or rerun) job again from its stored counts, in one
        transaction: status ``running`` with no detail and no ``finished_at``, no cancel
        flag, no budget note, and every instructor's streaks, last failure and skip reset
        (``CategoryCounts.resume``); counts and usage are kept. Raises NotFoundError."""
        ...

    async def delete(self, job_id: str) -> None:
        """Remove the job and everything of it, in one transaction: rows, counters,
        tasks, processed messages, artifacts, dead letters, and the dedupe vectors of its
        namespace and of its instructors' own namespaces (``<job_id>:<instructor>``).
        A job that does not exist is nothing to do."""
        ...

    async def try_lease(self, job_id: str, owner: str, seconds: float) -> bool:
        """Take or renew the job's lease for ``owner`` until ``seconds`` from now, if
        nobody else holds an unexpired one; False otherwise (and for a job that does not
        exist). Atomic: of concurrent callers for a free lease, exactly one gets it."""
        ...

    async def release_lease(self, job_id: str, owner: str) -> None:
        """Give up the lease if ``owner`` holds it; otherwise nothing happens."""
        ...

    async def set_export(self, job_id: str, uri: str) -> None:
        """Record where the job's export was written."""
        ...

    async def set_export_pending(self, job_id: str, pending: bool, error: str | None) -> None:
        """Mark the job's export as still to be written (with the last failure, if any),
        or as written."""
        ...

    async def pending_exports(self) -> list[str]:
        """The ids of the jobs whose export is still to be written."""
        ...

    async def llm_api_key(self, job_id: str) -> str | None:
        """The job's own key for its LLM endpoint, if it gave one. Raises NotFoundError."""
        ...


class UploadRepository(Protocol):
    """Documents uploaded through the API (the files are in the object store)."""

    async def add(self, upload_id: str, *, owner: str | None, files: list[dict[str, Any]]) -> None:
        """Record a new upload: its owner and its files (``{"name", "bytes"}`` each).
        ``upload_id`` is fresh: an id used before is refused (the driver's integrity
        error), never overwritten."""
        ...

    async def get(self, upload_id: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(owner, files) of an upload. Raises NotFoundError."""
        ...


class ProgressRepository(Protocol):
    """Each instructor's counters (``CategoryCounts``), its tasks in flight with the room
    in the count they hold, and its cursor. The counting rules are airoboros.counting;
    this applies them inside its transactions."""

    async def stats(self, job_id: str) -> dict[str, CategoryCounts]:
        """Each instructor's counters, with ``reserved``: the room its tasks in flight
        hold. Empty for a job that does not exist."""
        ...

    async def add_stats(self, job_id: str, instructor: str, **deltas: float) -> None:
        """Add to an instructor's usage counters (``STAT_FIELDS`` only; anything else
        raises ValueError before anything is written), creating its counters if it has
        none. Not idempotent: the caller adds each delta once."""
        ...

    async def set_skipped(self, job_id: str, instructor: str, reason: str) -> None:
        """Mark an instructor as having nothing to do in this run (not a failure); a
        resume clears it."""
        ...

    async def advance_cursor(self, job_id: str, instructor: str, n: int) -> int:
        """Move the instructor's cursor ``n`` places on and return where it was: the
        places ``start .. start + n - 1`` are the caller's alone, whatever concurrent
        callers do (they get disjoint ranges)."""
        ...

    async def add_task(self, job_id: str, task_id: str, instructor: str, asked: int = 0) -> None:
        """Record a task in flight (before its message is published), asking for
        ``asked`` items. ``task_id`` is fresh: an id used before is refused."""
        ...

    async def in_flight(self, job_id: str) -> dict[str, int]:
        """Per instructor, how many of its tasks are in flight (absent: none)."""
        ...

    async def flights(self, job_id: str) -> dict[str, Flight]:
        """Per instructor, its tasks in flight: how many, how many not screened yet (and
        the items they ask for), and the room the screened ones hold."""
        ...

    async def grant(
        self, job_id: str, task_id: str, instructor: str, counts: Sequence[int]
    ) -> list[int]:
        """Reserve room in the instructor's count for a screened task's candidates
        (``counts[i]`` rows each), first come while the room lasts (target minus accepted
        minus what the other tasks in flight hold), atomically with every other writer of
        that count: concurrent grants never hand out more than the room. The task holds
        what it got until it completes or expires. Idempotent per task: a repeated grant
        recomputes the task's own reservation instead of adding to it. A task that is
        unknown or no longer in flight gets nothing. Returns the rows granted to each
        candidate (``CategoryCounts.grant``)."""
        ...

    async def expire_tasks(self, job_id: str, older_than: datetime) -> int:
        """Give up on the tasks in flight since before ``older_than`` (their message was
        lost): they stop counting as in flight and free the room they held. A late
        completion of one is still applied. Returns how many expired."""
        ...


class RowRepository(Protocol):
    """The dataset's rows, and the transactions that count them in.

    A row may be marked bad (``mark_bad``, by a person): it stays in the store and keeps
    counting toward its instructor's target, but it is no longer part of the dataset.
    Every reader of the dataset (``iterate``, ``count``, ``count_by_category``,
    ``sample``) leaves bad rows out unless it asks for them (``iterate(include_bad=True)``,
    the console's listing, so that a row can be unmarked)."""

    async def apply_batch(
        self,
        job_id: str,
        *,
        message_id: str,
        task_id: str,
        instructor: str,
        items: Sequence[Item],
        stats: BatchStats,
        artifacts: Sequence[Artifact] = (),
        error: str | None = None,
        error_message: str | None = None,
    ) -> list[StoredItem] | None:
        """Commit one finished batch (a ``BatchCompleted``) in ONE transaction: its rows
        (source ids ``<task_id>:<index>``, capped at the instructor's target, an
        uncounted row following the counted row before it), its artifacts (new names
        only, each counting toward the target while there is room; the others count as
        duplicates), its counters, streaks and usage (``CategoryCounts.apply``), the
        budget note when ``error`` is ``budget_exhausted``, the task's completion (which
        frees the room it held), and ``message_id`` as processed.

        Idempotent by ``message_id``: a message applied before (also by a concurrent
        delivery) writes nothing and returns None. Concurrent batches of one instructor
        never take it past its target. Returns the rows inserted, in order."""
        ...

    async def add(
        self, job_id: str, items: Sequence[tuple[str, Item]], *, cap: bool = True
    ) -> list[StoredItem]:
        """Insert rows keyed by source id (``(source_id, item)``), in one transaction.
        A source id stored before, or earlier in the same call, is skipped (idempotent);
        with ``cap``, counted rows past the instructor's target are dropped, atomically
        with every other writer (an instructor without counters has target 0); without
        it, every new row is kept. Counted rows inserted add to ``accepted``.
        Instruction, response and system are stripped. Returns the rows inserted, in
        order."""
        ...

    async def count(self, job_id: str) -> int:
        """How many rows the job's dataset has, bad rows left out (0 for no job)."""
        ...

    async def count_bad(self, job_id: str) -> int:
        """How many of the job's rows are marked bad (0 for no job)."""
        ...

    async def count_by_category(self, job_id: str) -> dict[str, int]:
        """Rows of the dataset per category, bad rows left out."""
        ...

    def iterate(
        self,
        job_id: str,
        *,
        after: int = 0,
        category: str | None = None,
        page_size: int = 1000,
        include_bad: bool = False,
        search: str | None = None,
    ) -> AsyncIterator[StoredItem]:
        """The job's rows with a sequence number above ``after`` (of ``category``, if
        given) in insertion order, read ``page_size`` at a time (each page its own short
        transaction, so rows committed meanwhile after the last page read are included).
        Rows marked bad only with ``include_bad``. With ``search``, only rows whose
        instruction, response or system contains it, case-insensitively (as a literal
        string: ``%``, ``_`` and the escape character match themselves; letters beyond
        ASCII fold case on PostgreSQL, not on SQLite)."""
        ...

    async def mark_bad(self, job_id: str, seq: int, bad: bool) -> StoredItem:
        """Mark the job's row ``seq`` bad (or good again) and return it. Idempotent.
        Raises NotFoundError when the job has no row ``seq``."""
        ...

    async def sample(
        self, job_id: str, categories: Sequence[str], n: int, *, unused_by: str | None = None
    ) -> list[StoredItem]:
        """Up to ``n`` random rows of the given categories (source material for editor
        and stylized_response), bad rows left out; with ``unused_by``, only rows whose response is not yet
        the response of a row of that category (a writing row editor has not used)."""
        ...


class ArtifactRepository(Protocol):
    """A job's products that are not rows (character cards), unique per job by kind and
    case-folded, space-collapsed name. Those made by batches come in with
    ``RowRepository.apply_batch``."""

    async def add(
        self, job_id: str, artifacts: Sequence[Artifact], *, count_as: str | None = None
    ) -> int:
        """Add, in one transaction, the artifacts whose (kind, name) the job does not
        have yet (idempotent; an empty name is never added); with ``count_as``, each one
        added counts toward that instructor's ``accepted``. Returns how many were added."""
        ...

    async def of_kind(self, job_id: str, kind: str) -> list[Artifact]:
        """The job's artifacts of ``kind``, in the order they were added."""
        ...


class AdapterRegistry(Protocol):
    """The trained experts: one record per (expert, version)."""

    async def register(
        self,
        expert: str,
        version: str,
        *,
        base_model: str,
        job_id: str | None = None,
        dataset_uri: str | None = None,
    ) -> None:
        """Record that ``expert`` ``version`` is being trained (status ``training``).
        Idempotent: registering a version again (a retried training) starts its record
        over, keeping its job and dataset."""
        ...

    async def finish(
        self,
        expert: str,
        version: str,
        *,
        status: str,
        uri: str | None = None,
        metrics: dict[str, Any] | None = None,
        detail: str | None = None,
    ) -> None:
        """Record how training a registered version ended (``published`` with its uri
        and metrics, or ``failed`` with a detail). Raises NotFoundError when the version
        was not registered."""
        ...

    async def adapters(
        self, expert: str | None = None, *, job_id: str | None = None
    ) -> list[AdapterInfo]:
        """Registered versions, newest registration first; of one expert, or trained on
        one job's dataset, when given."""
        ...


class VectorRepository(Protocol):
    """Accepted dedupe embeddings, per namespace (a job, or ``<job>:<instructor>``), so
    that any dedupe replica can rebuild its index and catch up with the others."""

    async def add(self, namespace: str, keys: Sequence[str], vectors: npt.ArrayLike) -> None:
        """Persist one float32 row of ``vectors`` per key, in one transaction (a number of
        rows other than of keys raises ValueError, and nothing is written). Idempotent by
        key: a key the namespace has is skipped."""
        ...

    async def load(
        self, namespace: str, *, after: int = 0
    ) -> tuple[list[int], list[str], npt.NDArray[np.float32]]:
        """The vectors persisted with a sequence number above ``after``, in that order:
        (sequence numbers, keys, a [n, dim] float32 array; [0, 0] when none). Pass the
        last sequence number seen to get only what was added since."""
        ...

    async def count(self, namespace: str) -> int: ...

    def exclusive(self, namespace: str) -> AbstractAsyncContextManager[None]:
        """Held by one holder at a time per namespace, across processes (PostgreSQL: a
        transaction-scoped advisory lock on a hash of the namespace, released when the
        block ends, or when the holder's connection dies). Dedupe holds it around sync,
        check and durable ``add``, so replicas screening one namespace take turns and each
        sees every vector the one before it accepted. On SQLite (one process: the embedded
        mode) it excludes nothing across processes."""
        ...


class DeadLetterRepository(Protocol):
    """Messages the bus gave up on, kept to be shown in their job's status."""

    async def add(
        self,
        *,
        queue: str,
        body: str,
        job_id: str | None,
        message_id: str | None,
        kind: str | None,
        reason: str | None = None,
    ) -> None:
        """Record one dead-lettered message, with why the bus gave up on it (a message
        dead-lettered twice is recorded twice)."""
        ...

    async def for_job(self, job_id: str) -> list[dict[str, Any]]:
        """The job's dead letters in the order they were recorded: ``queue``,
        ``message_id``, ``kind``, ``reason`` and ``created_at`` (ISO 8601) each."""
        ...


@dataclass
class PendingCall:
    """(batch lane) A call to send in a batch job: its key, request body, and how many
    times it was submitted already."""

    key: str
    body: dict[str, Any]
    attempts: int = 0


@dataclass
class ReadyCommand:
    """(batch lane) A waiting command whose every call is answered or failed for good."""

    command_id: str
    task_id: str
    instructor: str
    command: dict[str, Any]
    #: answers by call key (a superset of the command's own)
    answers: dict[str, BatchAnswer]


@dataclass
class Submission:
    """(batch lane) One batch job as the store has it."""

    id: str
    job_id: str
    instructor: str
    #: submitting | open | completed | failed | expired | cancelled
    state: str
    batch_id: str | None = None
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    reserved_cost: float = 0.0
    reserved_tokens: int = 0


class BatchRepository(Protocol):
    """(batch lane) What the controller keeps of calls sent through the Batch API: the
    calls (by key), the commands waiting for their answers, and the batch jobs (ids, file
    ids, states), so that a restart neither submits a batch twice nor loses one."""

    async def defer(
        self,
        job_id: str,
        *,
        command_id: str,
        task_id: str,
        instructor: str,
        command: dict[str, Any],
        calls: Sequence[tuple[str, dict[str, Any]]],
    ) -> bool:
        """Record a deferred command and its calls (keys already known are not added
        again: an answered call stays answered). False when ``command_id`` is known (a
        redelivery): nothing is written."""
        ...

    async def pending(self, job_id: str, instructor: str, limit: int) -> list[PendingCall]:
        """Up to ``limit`` calls of ``instructor`` not yet in a batch job, oldest first."""
        ...

    async def pending_instructors(self, job_id: str) -> list[str]:
        """The instructors that have calls pending."""
        ...

    async def submit(
        self,
        job_id: str,
        instructor: str,
        keys: Sequence[str],
        reserved_cost: float,
        reserved_tokens: int = 0,
    ) -> Submission:
        """Record a new batch job (state ``submitting``, a fresh id) holding the pending
        calls among ``keys`` (their attempts go up by one), atomically."""
        ...

    async def calls_of(self, submission_id: str) -> list[PendingCall]:
        """The calls a batch job holds (still submitted in it)."""
        ...

    async def update_submission(self, submission_id: str, **fields: Any) -> None:
        """Set ``state``, ``batch_id`` or file ids of a batch job."""
        ...

    async def submissions(self, job_id: str, *, unfinished: bool = False) -> list[Submission]:
        """The job's batch jobs, oldest first; ``unfinished``: only those submitting or
        open."""
        ...

    async def apply(
        self,
        submission_id: str,
        state: str,
        answers: dict[str, BatchAnswer],
        *,
        max_attempts: int,
        errors: dict[str, str] | None = None,
    ) -> tuple[int, int]:
        """Store a finished batch job's results and set its final ``state``, in one
        transaction: each of its calls with an answer is answered; each without one is
        pending again while it has attempts left, else failed for good (with ``errors``'
        reason). Returns (answered, pending again); (0, 0) when the job was applied
        already."""
        ...

    async def fail_pending(self, job_id: str, instructor: str, error: str) -> int:
        """Fail for good every pending call of ``instructor`` (the budget cannot hold
        them); returns how many."""
        ...

    async def ready(self, job_id: str) -> list[ReadyCommand]:
        """The waiting commands whose calls all have an answer or failed, oldest first."""
        ...

    async def answers(self, job_id: str, keys: Sequence[str]) -> dict[str, BatchAnswer]:
        """The answers (or final failures) stored for ``keys``."""
        ...

    async def dispatched(self, job_id: str, command_id: str) -> bool:
        """Mark a waiting command as sent again; False when it was not waiting (another
        controller sent it)."""
        ...

    async def waiting_tasks(self, job_id: str) -> list[str]:
        """Tasks with a command waiting for answers."""
        ...

    async def keep_alive(self, job_id: str, task_ids: Sequence[str]) -> int:
        """Keep these tasks in flight (restart their clock; an expired one counts again):
        a task waiting for a batch job is not lost."""
        ...

    async def revive(self, job_id: str) -> int:
        """Mark waiting again the latest command of each unfinished task that was sent
        already (in-process, it died with the process that ran it); returns how many."""
        ...

    async def unapplied_usage(self, job_id: str) -> tuple[int, float]:
        """Tokens and USD of the answered calls whose task has not completed yet: billed
        by the Batch API, but not yet in the job's counters (``ProgressRepository.stats``)."""
        ...

    async def counts(self, job_id: str) -> dict[str, dict[str, int]]:
        """Per instructor, its batch jobs by state."""
        ...


class Store(Protocol):
    """The SQL store: every repository over one database, and its connection."""

    @property
    def jobs(self) -> JobRepository: ...
    @property
    def uploads(self) -> UploadRepository: ...
    @property
    def progress(self) -> ProgressRepository: ...
    @property
    def rows(self) -> RowRepository: ...
    @property
    def artifacts(self) -> ArtifactRepository: ...
    @property
    def registry(self) -> AdapterRegistry: ...
    @property
    def vectors(self) -> VectorRepository: ...
    @property
    def dead_letters(self) -> DeadLetterRepository: ...
    @property
    def batches(self) -> BatchRepository: ...

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        ...

    async def connect(self, *, migrate: bool = True) -> None:
        """Open the pool; with ``migrate`` (the embedded default) first run the pending
        migrations (a failure raises StoreError). Nothing connects before this; every
        repository raises RuntimeError until it is called."""
        ...

    async def close(self) -> None:
        """Close the pool (idempotent)."""
        ...

    async def ping(self) -> bool:
        """Whether the database answers a trivial query within two seconds; never
        raises."""
        ...
