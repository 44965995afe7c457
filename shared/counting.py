"""The counting rules of a job, as plain data and pure functions, with no I/O.

Per category (one instructor of one job): which rows of a finished batch are kept (never
past ``count``), how much room in the count a screened batch may reserve before its
response step is paid for, how many items the next batch should ask for, and when the
category is done or cannot progress. The SQL store applies these rules inside its
transactions; the controller reads them to decide what to dispatch.

A category stops only when it truly cannot progress: ``StopPolicy.max_failed_batches``
batches in a row without one usable item (every reply refused, unparseable, filtered,
or its calls failed), or ``max_duplicate_batches`` in a row whose every usable item was
a duplicate. While items keep coming, it keeps going, with smaller batches, one at a
time, when whole replies keep failing. A stop is derived from those streaks, never
stored as a verdict: resuming the job (or rerunning its config) resets them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from airoboros.contracts import BatchStats

#: Errors after which no call of the job can succeed (a single bad request can be the
#: prompt's fault, so it only counts as a failure).
FATAL_ERRORS = frozenset({"auth_error", "model_not_found", "structured_output_unsupported"})
#: Excerpts of the endpoint's answers kept in a stop reason, in characters.
EXCERPT_CHARS = 160


@dataclass(frozen=True)
class StopPolicy:
    #: batches in a row without a single usable item before a category stops
    max_failed_batches: int = 20
    #: batches in a row whose every usable item was a duplicate before a category stops
    max_duplicate_batches: int = 100
    #: from this many failed batches in a row, batches of the category go out one at a
    #: time, after a growing pause (``backoff``), and ask for fewer items each
    probe_after: int = 3


@dataclass(frozen=True)
class BatchOutcome:
    """What one finished batch did, as the store saw it when committing it."""

    stats: BatchStats
    #: counted rows (and artifacts) the batch produced, kept or not
    produced: int
    #: counted rows (and artifacts) stored: new in the dataset
    kept: int
    error: str | None = None
    error_message: str | None = None
    #: tokens paid for rows that were dropped past the count
    dropped_tokens: float = 0.0


@dataclass
class CategoryCounts:
    """The durable counters of one category, as stored; ``reserved`` is derived (room
    held in the count by screened batches still in flight)."""

    name: str
    target: int = 0
    accepted: int = 0
    duplicates: int = 0
    filtered: int = 0
    refused: int = 0
    unparseable: int = 0
    truncated: int = 0
    failures: int = 0
    withheld: int = 0
    retries: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    #: finished batches
    batches: int = 0
    #: items asked for by finished batches that gave any usable item, less those withheld
    #: for want of room (the basis of the yield estimate)
    asked: int = 0
    #: counted rows finished batches produced (kept, or dropped past the count)
    rows_from_batches: int = 0
    #: rows dropped because the count was already reached
    dropped: int = 0
    #: batches in a row without a usable item, and in a row with duplicates only
    fail_streak: int = 0
    dup_streak: int = 0
    #: the cause of the last batch without a usable item, with an excerpt of its answer
    last_failure: str | None = None
    #: why the category has nothing to do (editor without writing rows): not a failure
    skipped: str | None = None
    #: tokens of finished batches that bought no kept row (see ``apply``)
    wasted_tokens: float = 0.0
    #: candidates step 1 proposed: usable items after the per-item checks (what dedupe
    #: screened); the top of the quality report's funnel (airoboros.report)
    proposed: int = 0
    reserved: int = field(default=0, compare=False)

    # --- what is left ---------------------------------------------------------------
    @property
    def need(self) -> int:
        """Rows still missing from the count."""
        return max(0, self.target - self.accepted)

    @property
    def room(self) -> int:
        """Rows still missing that no batch in flight has reserved."""
        return max(0, self.target - self.accepted - self.reserved)

    @property
    def done(self) -> bool:
        return self.accepted >= self.target

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def yield_per_item(self, batch_size: int, rows_per_item: float = 1.0) -> float:
        """Counted rows a requested item turns into, learnt from finished batches and
        smoothed toward ``rows_per_item`` (what the instructor expects an item to make:
        trivia's with a detail row make more than one) by one batch's worth of prior
        items. Duplicates, refusals and filters make it smaller."""
        prior = max(1, batch_size)
        y = (self.rows_from_batches + prior * rows_per_item) / (self.asked + prior)
        return min(4.0, max(0.05, y))

    # --- planning -------------------------------------------------------------------
    def effective_batch_size(self, batch_size: int, policy: StopPolicy) -> int:
        """Smaller batches while whole replies keep failing (a reply cut off by the token
        limit, or refused, loses less when it is short), back to full on progress."""
        if self.fail_streak < policy.probe_after - 1:
            return batch_size
        halvings = min(4, self.fail_streak - policy.probe_after + 2)
        return max(1, math.ceil(batch_size / (2.0**halvings)))

    def probing(self, policy: StopPolicy) -> bool:
        """Whether batches go out one at a time (whole replies keep failing)."""
        return self.fail_streak >= policy.probe_after

    def backoff(self, policy: StopPolicy) -> float:
        """Seconds to wait before the next probe."""
        if not self.probing(policy):
            return 0.0
        return min(5.0, 0.5 * 2.0 ** (self.fail_streak - policy.probe_after))

    def plan(
        self,
        batch_size: int,
        *,
        slots: int,
        pending_items: int,
        policy: StopPolicy,
        rows_per_item: float = 1.0,
    ) -> list[int]:
        """Sizes of the batches to dispatch now (items each): enough to fill the room
        left by accepted rows, reservations and the best yield ``pending_items`` (items
        asked by batches in flight that were not screened yet) could have, at most
        ``slots`` batches. The last one asks for what is still expected missing, with a
        margin of one standard deviation of the yield, so little is paid for past the
        count and few calls are spent on a short tail."""
        if self.settled(policy) or slots <= 0:
            return []
        y = self.yield_per_item(batch_size, rows_per_item)
        # Batches in flight are counted as if none of their items were lost: a new batch
        # goes out only when even that would leave the count short. (A batch that did
        # better than expected would otherwise find no room left: paid, then withheld.)
        gap = self.room - pending_items * max(y, rows_per_item)
        size = self.effective_batch_size(batch_size, policy)
        out: list[int] = []
        while gap > 1e-9 and len(out) < slots:
            # One standard deviation more than the expected need: an item too many costs
            # its share of one reply, an item too few another whole call (its prompt).
            p = min(1.0, y)
            margin = math.sqrt(gap * (1 - p)) / p
            k = min(size, max(1, math.ceil(gap / y + margin)))
            out.append(k)
            gap -= k * y
        return out

    # --- screening ------------------------------------------------------------------
    def grant(self, counts: Sequence[int]) -> list[int]:
        """How many rows each screened candidate (able to make ``counts[i]``) may have
        its response step paid for: first come, while the room lasts; the last one that
        fits may get less than it could make (trivia then skips its detail row), and the
        rest none (withheld). The caller adds the total to ``reserved``."""
        room = self.room
        out: list[int] = []
        for c in counts:
            got = min(c, room)
            out.append(got)
            room -= got
        return out

    # --- committing -----------------------------------------------------------------
    def admit(self, rows: Sequence[tuple[bool, bool]], *, cap: bool = True) -> list[bool]:
        """Which rows to insert, given (counted, already stored) for each, in order.
        A counted row is kept while the count has room (with ``cap``); an uncounted row
        (a later turn of an rp chat) shares the fate of the counted row before it. Rows
        already stored (a redelivery) are never inserted again. Updates ``accepted``."""
        keep_group = True
        out: list[bool] = []
        for counted, seen in rows:
            if counted:
                keep_group = not (cap and self.accepted >= self.target)
            ok = keep_group and not seen
            out.append(ok)
            if ok and counted:
                self.accepted += 1
        return out

    def admit_artifact(self) -> bool:
        """Room for one more artifact (a character card) counted toward the target."""
        return self.accepted < self.target

    def apply(self, outcome: BatchOutcome) -> None:
        """Add a finished batch's counters and streaks (``accepted`` was already advanced
        by ``admit``)."""
        s = outcome.stats
        self.duplicates += s.duplicates
        self.filtered += s.filtered
        self.refused += s.refused
        self.unparseable += s.unparseable
        self.truncated += s.truncated
        self.failures += s.failures
        self.withheld += s.withheld
        self.retries += s.retries
        self.requests += s.requests
        self.prompt_tokens += s.prompt_tokens
        self.completion_tokens += s.completion_tokens
        self.cost += s.cost
        self.batches += 1
        self.proposed += s.proposed
        if s.proposed > 0 or outcome.produced > 0:
            # The yield is learnt from replies that worked: a wholly failed one is retried
            # (and counted in the streak), not a reason to ask for more items at once.
            self.asked += max(0, s.asked - s.withheld)
        self.rows_from_batches += outcome.produced
        self.dropped += max(0, outcome.produced - outcome.kept)
        # Tokens that bought no kept row: all of a batch that kept none; else those it
        # lost on the way (unusable answers, the completion shares of lost items; see
        # BatchStats.lost_tokens) and those of its rows dropped past the count.
        if outcome.kept == 0:
            self.wasted_tokens += s.tokens
        else:
            self.wasted_tokens += min(float(s.tokens), s.lost_tokens + outcome.dropped_tokens)

        if outcome.kept > 0 or s.withheld > 0:
            # Progress, or a batch that fit no more into a count held by others.
            self.fail_streak = self.dup_streak = 0
        elif s.duplicates > 0:
            # Usable items that the dataset already has: the endpoint works.
            self.fail_streak = 0
            self.dup_streak += 1
        elif outcome.produced == 0:
            self.fail_streak += 1
            excerpt = f"; last answer: {shorten(s.excerpt)!r}" if s.excerpt else ""
            self.last_failure = failure_cause(outcome) + excerpt
        # (rows made but all dropped past the count: the category is done)

    def stop_reason(self, policy: StopPolicy) -> str | None:
        """Why the category cannot progress, or None while it can. Derived from the
        streaks, which a resume resets: no stop outlives the run that met it."""
        if self.done:
            return None
        if self.fail_streak >= policy.max_failed_batches:
            return (
                f"{self.name}: no usable item in {self.fail_streak} batches in a row "
                f"({self.last_failure or 'no items in the answers'})"
            )
        if self.dup_streak >= policy.max_duplicate_batches:
            return (
                f"{self.name}: {self.dup_streak} batches in a row brought only duplicates "
                "of rows already in the dataset; add topics, raise the temperature or "
                "lower min_docsearch_score"
            )
        return None

    def settled(self, policy: StopPolicy) -> bool:
        """Nothing more will be dispatched for it in this run: done, stopped or skipped."""
        return self.done or self.skipped is not None or self.stop_reason(policy) is not None

    def resume(self) -> None:
        """Forget an earlier stop: the category is tried again from its counts."""
        self.skipped = self.last_failure = None
        self.fail_streak = self.dup_streak = 0


def failure_cause(outcome: BatchOutcome) -> str:
    """Why a batch gave no usable item, in words a person can act on."""
    s = outcome.stats
    if outcome.error:
        return f"endpoint errors: {outcome.error_message or outcome.error}"
    causes = []
    if s.refused:
        causes.append("refused")
    if s.filtered:
        causes.append("filtered by response_filters or the instructor's checks")
    if s.unparseable:
        causes.append("unparseable answers")
    if s.truncated:
        causes.append("cut off by the token limit")
    if s.failures:
        causes.append("failed calls")
    if not causes:
        return "no items in the answers"
    if len(causes) == 1 and causes[0] == "refused":
        return "all refused"
    return ", ".join(causes)


def shorten(text: str | None, n: int = EXCERPT_CHARS) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= n else flat[: n - 1] + "…"


def job_outcome(
    categories: Sequence[CategoryCounts], policy: StopPolicy
) -> tuple[str, str | None] | None:
    """The job's end once every category is settled: ("done", what was skipped) or
    ("incomplete", why each stopped category stopped); None while one can progress."""
    if not all(c.settled(policy) for c in categories):
        return None
    stopped = [r for c in categories if (r := c.stop_reason(policy))]
    skipped = [f"{c.name} skipped: {c.skipped}" for c in categories if c.skipped and not c.done]
    if stopped:
        return "incomplete", "; ".join([*stopped, *skipped])
    return "done", "; ".join(skipped) or None
