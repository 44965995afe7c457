"""The counting rules (airoboros.counting), without a database."""

from __future__ import annotations

import pytest

from airoboros.contracts import BatchStats
from airoboros.counting import BatchOutcome, CategoryCounts, StopPolicy, job_outcome

POLICY = StopPolicy(max_failed_batches=4, max_duplicate_batches=6, probe_after=2)


def batch(kept: int = 0, produced: int | None = None, **stats: int) -> BatchOutcome:
    return BatchOutcome(
        BatchStats(**stats), produced=kept if produced is None else produced, kept=kept
    )


def test_admit_stops_at_the_count_and_keeps_chats_whole() -> None:
    c = CategoryCounts("rp", target=2)
    # (counted, already stored): two chats of two rows, then a third chat past the count.
    flags = c.admit([(True, False), (False, False), (True, False), (False, False), (True, False)])
    assert flags == [True, True, True, True, False]
    assert c.accepted == 2
    # A redelivered row is never inserted again, and does not count twice.
    c2 = CategoryCounts("general", target=5, accepted=1)
    assert c2.admit([(True, True), (True, False)]) == [False, True]
    assert c2.accepted == 2
    # Without the cap (rows adopted from an existing output) everything goes in.
    c3 = CategoryCounts("general", target=1, accepted=1)
    assert c3.admit([(True, False)], cap=False) == [True] and c3.accepted == 2


def test_grant_reserves_room_first_come_and_counts_rows_per_candidate() -> None:
    c = CategoryCounts("trivia", target=10, accepted=5, reserved=2)
    # Room is 3: a two-row candidate (with its detail row), then one, then none fit.
    assert c.grant([2, 1, 1, 2]) == [2, 1, 0, 0]
    # The last one that fits may get less than it could make (no detail row).
    assert c.grant([1, 2, 2]) == [1, 2, 0]
    c.reserved = 10
    assert c.grant([1]) == [0]  # held by others: nothing is paid for past the count


def test_streaks_progress_duplicates_and_failures() -> None:
    c = CategoryCounts("joke", target=10)
    c.apply(batch(refused=5, excerpt="I'm sorry, but I can't help with that request."))
    c.apply(batch(refused=5))
    assert c.fail_streak == 2 and c.stop_reason(POLICY) is None
    c.apply(batch(kept=1, refused=4))  # one usable item is progress
    assert c.fail_streak == 0
    for _ in range(3):
        c.apply(batch(refused=5, excerpt="I'm sorry, but I can't help with that request."))
    assert c.stop_reason(POLICY) is None
    c.apply(batch(refused=5, excerpt="I'm sorry, but I can't help with that request."))
    reason = c.stop_reason(POLICY)
    assert reason is not None
    assert reason.startswith("joke: no usable item in 4 batches in a row (all refused")
    assert "I'm sorry" in reason
    # Duplicates only: the endpoint works, so it is another, longer streak.
    d = CategoryCounts("riddle", target=10)
    for _ in range(5):
        d.apply(batch(duplicates=3))
    assert d.fail_streak == 0 and d.stop_reason(POLICY) is None
    d.apply(batch(duplicates=3))
    assert "only duplicates" in (d.stop_reason(POLICY) or "")
    # A batch that fit nothing into a count held by others is no failure.
    e = CategoryCounts("general", target=10, fail_streak=3)
    e.apply(batch(withheld=2))
    assert e.fail_streak == 0


@pytest.mark.parametrize(
    ("stats", "error", "cause"),
    [
        ({"unparseable": 1}, None, "unparseable answers"),
        ({"filtered": 4}, None, "filtered by response_filters"),
        ({"truncated": 1}, None, "cut off by the token limit"),
        ({"failures": 1}, "server_error", "endpoint errors: server error 500"),
    ],
)
def test_a_stop_names_its_cause(stats: dict[str, int], error: str | None, cause: str) -> None:
    c = CategoryCounts("general", target=3)
    for _ in range(4):
        c.apply(
            BatchOutcome(
                BatchStats(**stats),
                produced=0,
                kept=0,
                error=error,
                error_message="server error 500: boom" if error else None,
            )
        )
    assert cause in (c.stop_reason(POLICY) or "")


def test_no_stop_outlives_a_resume_and_a_done_category_never_stops() -> None:
    c = CategoryCounts("general", target=3, fail_streak=9, dup_streak=9, skipped="x")
    assert c.stop_reason(POLICY) is not None
    c.resume()
    assert c.stop_reason(POLICY) is None and c.skipped is None
    done = CategoryCounts("general", target=3, accepted=3, fail_streak=9)
    assert done.stop_reason(POLICY) is None and done.settled(POLICY)


def test_plan_fills_the_room_and_sizes_the_last_batch_to_what_is_missing() -> None:
    c = CategoryCounts("general", target=12)
    # No history: one item is expected to make one row.
    assert c.plan(5, slots=10, pending_items=0, policy=POLICY) == [5, 5, 2]
    # Items asked by batches in flight count against the room.
    assert c.plan(5, slots=10, pending_items=10, policy=POLICY) == [2]
    assert c.plan(5, slots=1, pending_items=0, policy=POLICY) == [5]
    # Half the items turn into rows: ask for twice what is missing (and a margin).
    half = CategoryCounts("general", target=12, accepted=10, asked=200, rows_from_batches=100)
    assert half.plan(5, slots=10, pending_items=0, policy=POLICY) == [5]
    # 5 items in 6 make a row: 8 missing is 9.6 items, plus one standard deviation.
    most = CategoryCounts("general", target=18, accepted=10, asked=100, rows_from_batches=80)
    assert most.yield_per_item(20) == pytest.approx(5 / 6)
    assert most.plan(20, slots=10, pending_items=0, policy=POLICY) == [11]
    # Reserved room is covered already.
    full = CategoryCounts("general", target=12, accepted=10, reserved=2)
    assert full.plan(5, slots=10, pending_items=0, policy=POLICY) == []


def test_whole_replies_failing_shrink_the_batches_and_probe_one_at_a_time() -> None:
    c = CategoryCounts("trivia", target=100)
    assert c.effective_batch_size(20, POLICY) == 20 and not c.probing(POLICY)
    c.fail_streak = 1
    assert c.effective_batch_size(20, POLICY) == 10
    c.fail_streak = 2
    assert c.probing(POLICY) and c.effective_batch_size(20, POLICY) == 5
    assert c.backoff(POLICY) == 0.5
    c.fail_streak = 30
    assert c.effective_batch_size(20, POLICY) == 2 and c.backoff(POLICY) == 5.0
    c.fail_streak = 0  # progress: back to full batches at once
    assert c.effective_batch_size(20, POLICY) == 20


def test_tokens_that_bought_nothing() -> None:
    c = CategoryCounts("general", target=100)
    # What the batch lost on the way (unusable answers, shares of lost items) ...
    c.apply(batch(kept=3, produced=3, duplicates=1, lost_tokens=100, prompt_tokens=400))
    assert c.wasted_tokens == pytest.approx(100.0)
    # ... and the tokens of rows dropped past the count ...
    c.apply(BatchOutcome(BatchStats(prompt_tokens=90), produced=3, kept=1, dropped_tokens=60))
    assert c.wasted_tokens == pytest.approx(160.0) and c.dropped == 2
    # ... never more than the batch paid; all of it when it kept no row.
    c.apply(batch(kept=1, lost_tokens=500, prompt_tokens=50, completion_tokens=50))
    assert c.wasted_tokens == pytest.approx(260.0)
    c.apply(batch(refused=5, lost_tokens=10, prompt_tokens=50, completion_tokens=30))
    assert c.wasted_tokens == pytest.approx(340.0)


def test_job_outcome() -> None:
    done = CategoryCounts("a", target=1, accepted=1)
    stuck = CategoryCounts("b", target=1, fail_streak=4, last_failure="all refused")
    running = CategoryCounts("c", target=1)
    skipped = CategoryCounts("editor", target=1, skipped="it needs writing rows")
    assert job_outcome([done, running], POLICY) is None
    assert job_outcome([done, skipped], POLICY) == (
        "done",
        "editor skipped: it needs writing rows",
    )
    status, detail = job_outcome([done, stuck], POLICY) or ("", "")
    assert status == "incomplete" and detail is not None and detail.startswith("b: no usable")
