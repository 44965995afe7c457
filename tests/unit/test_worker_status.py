"""Workers' view of whether a job runs (airoboros.worker.JobStatusCache)."""

from __future__ import annotations

from airoboros.worker import JobStatusCache


async def test_a_resumed_job_is_seen_running_at_once_and_a_cancel_within_the_ttl() -> None:
    """A worker that just dropped a cancelled job's message must not keep the job for
    cancelled: the resumed run's first task comes right after (the resumed job stalled on
    it). A running answer is cached for the ttl (a cancel is seen within it)."""
    status = {"job": False}
    asked: list[str] = []

    async def source(job_id: str) -> bool:
        asked.append(job_id)
        return status[job_id]

    cache = JobStatusCache(source, ttl=60.0)
    assert await cache.running("job") is False
    status["job"] = True  # resumed
    assert await cache.running("job") is True
    assert len(asked) == 2  # asked again, not the cached "cancelled"
    status["job"] = False  # cancelled again
    assert await cache.running("job") is True  # within the ttl: the cached answer
    assert len(asked) == 2
    cache.ttl = 0.0
    assert await cache.running("job") is False
