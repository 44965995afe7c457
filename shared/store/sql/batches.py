"""(batch lane) Calls, waiting commands and batch jobs on ``batch_calls``,
``batch_commands`` and ``batch_submissions``."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update

from airoboros.contracts import BatchAnswer
from airoboros.store.models import BatchCall, BatchCommand, BatchSubmission, Task
from airoboros.store.ports import PendingCall, ReadyCommand, Submission
from airoboros.store.sql.engine import Database

#: states of a submission whose batch job may still run (or was never created)
UNFINISHED = ("submitting", "open")


def _submission(r: BatchSubmission) -> Submission:
    return Submission(
        id=r.id,
        job_id=r.job_id,
        instructor=r.instructor,
        state=r.state,
        batch_id=r.batch_id,
        input_file_id=r.input_file_id,
        output_file_id=r.output_file_id,
        error_file_id=r.error_file_id,
        reserved_cost=r.reserved_cost,
        reserved_tokens=r.reserved_tokens,
    )


class SqlBatches:
    """``BatchRepository`` on the batch lane's tables."""

    def __init__(self, db: Database) -> None:
        self._db = db

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
        async with self._db.write() as s:
            if await s.get(BatchCommand, (job_id, command_id)) is not None:
                return False
            seq = (
                await s.execute(
                    select(func.coalesce(func.max(BatchCommand.seq), 0)).where(
                        BatchCommand.job_id == job_id
                    )
                )
            ).scalar_one()
            keys = list(dict.fromkeys(k for k, _ in calls))
            s.add(
                BatchCommand(
                    job_id=job_id,
                    command_id=command_id,
                    task_id=task_id,
                    instructor=instructor,
                    command=json.dumps(command),
                    keys=json.dumps(keys),
                    state="waiting",
                    seq=int(seq) + 1,
                )
            )
            known = set(
                (
                    await s.execute(
                        select(BatchCall.key).where(
                            BatchCall.job_id == job_id, BatchCall.key.in_(keys)
                        )
                    )
                ).scalars()
            )
            for key, body in calls:
                if key not in known:
                    known.add(key)
                    s.add(
                        BatchCall(
                            job_id=job_id,
                            key=key,
                            instructor=instructor,
                            task_id=task_id,
                            cost=0.0,
                            body=json.dumps(body),
                            state="pending",
                            attempts=0,
                        )
                    )
            return True

    async def pending(self, job_id: str, instructor: str, limit: int) -> list[PendingCall]:
        async with self._db.session() as s:
            rows = (
                await s.execute(
                    select(BatchCall)
                    .where(
                        BatchCall.job_id == job_id,
                        BatchCall.instructor == instructor,
                        BatchCall.state == "pending",
                    )
                    .order_by(BatchCall.created_at, BatchCall.key)
                    .limit(limit)
                )
            ).scalars()
            return [PendingCall(r.key, json.loads(r.body), r.attempts) for r in rows]

    async def pending_instructors(self, job_id: str) -> list[str]:
        async with self._db.session() as s:
            rows = await s.execute(
                select(BatchCall.instructor)
                .where(BatchCall.job_id == job_id, BatchCall.state == "pending")
                .distinct()
            )
            return sorted(rows.scalars())

    async def submit(
        self,
        job_id: str,
        instructor: str,
        keys: Sequence[str],
        reserved_cost: float,
        reserved_tokens: int = 0,
    ) -> Submission:
        sub_id = "sub-" + uuid.uuid4().hex
        async with self._db.write() as s:
            row = BatchSubmission(
                id=sub_id,
                job_id=job_id,
                instructor=instructor,
                state="submitting",
                reserved_cost=reserved_cost,
                reserved_tokens=reserved_tokens,
            )
            s.add(row)
            await s.execute(
                update(BatchCall)
                .where(
                    BatchCall.job_id == job_id,
                    BatchCall.key.in_(list(keys)),
                    BatchCall.state == "pending",
                )
                .values(state="submitted", submission_id=sub_id, attempts=BatchCall.attempts + 1)
            )
            await s.flush()
            return _submission(row)

    async def calls_of(self, submission_id: str) -> list[PendingCall]:
        async with self._db.session() as s:
            rows = (
                await s.execute(
                    select(BatchCall)
                    .where(BatchCall.submission_id == submission_id)
                    .order_by(BatchCall.created_at, BatchCall.key)
                )
            ).scalars()
            return [PendingCall(r.key, json.loads(r.body), r.attempts) for r in rows]

    async def update_submission(self, submission_id: str, **fields: Any) -> None:
        allowed = {"state", "batch_id", "input_file_id", "output_file_id", "error_file_id"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"not a submission field: {sorted(bad)}")
        async with self._db.write() as s:
            await s.execute(
                update(BatchSubmission)
                .where(BatchSubmission.id == submission_id)
                .values(**fields, updated_at=datetime.now(UTC))
            )

    async def submissions(self, job_id: str, *, unfinished: bool = False) -> list[Submission]:
        async with self._db.session() as s:
            q = select(BatchSubmission).where(BatchSubmission.job_id == job_id)
            if unfinished:
                q = q.where(BatchSubmission.state.in_(UNFINISHED))
            rows = (await s.execute(q.order_by(BatchSubmission.created_at))).scalars()
            return [_submission(r) for r in rows]

    async def apply(
        self,
        submission_id: str,
        state: str,
        answers: dict[str, BatchAnswer],
        *,
        max_attempts: int,
        errors: dict[str, str] | None = None,
    ) -> tuple[int, int]:
        errors = errors or {}
        answered = retried = 0
        async with self._db.write() as s:
            sub = await s.get(BatchSubmission, submission_id)
            if sub is None or sub.state not in UNFINISHED:
                return (0, 0)  # applied already (another replica, or a repeat)
            calls = (
                (
                    await s.execute(
                        select(BatchCall).where(
                            BatchCall.submission_id == submission_id,
                            BatchCall.state == "submitted",
                        )
                    )
                )
                .scalars()
                .all()
            )
            for call in calls:
                answer = answers.get(call.key)
                if answer is not None:
                    call.state, call.answer = "answered", answer.model_dump_json()
                    call.cost = answer.cost
                    call.tokens = answer.prompt_tokens + answer.completion_tokens
                    answered += 1
                elif call.attempts >= max_attempts:
                    why = errors.get(call.key) or f"batch {state}"
                    failed = BatchAnswer(error=f"{why} (after {call.attempts} submissions)")
                    call.state, call.answer = "failed", failed.model_dump_json()
                else:
                    call.state, call.submission_id = "pending", None
                    retried += 1
            sub.state = state
            sub.updated_at = datetime.now(UTC)
        return answered, retried

    async def fail_pending(self, job_id: str, instructor: str, error: str) -> int:
        async with self._db.write() as s:
            res = await s.execute(
                update(BatchCall)
                .where(
                    BatchCall.job_id == job_id,
                    BatchCall.instructor == instructor,
                    BatchCall.state == "pending",
                )
                .values(state="failed", answer=BatchAnswer(error=error).model_dump_json())
            )
            return int(res.rowcount)  # type: ignore[attr-defined]

    async def ready(self, job_id: str) -> list[ReadyCommand]:
        async with self._db.session() as s:
            waiting = (
                (
                    await s.execute(
                        select(BatchCommand)
                        .where(BatchCommand.job_id == job_id, BatchCommand.state == "waiting")
                        .order_by(BatchCommand.seq)
                    )
                )
                .scalars()
                .all()
            )
            if not waiting:
                return []
            done = {
                k: BatchAnswer.model_validate_json(a)
                for k, a in (
                    await s.execute(
                        select(BatchCall.key, BatchCall.answer).where(
                            BatchCall.job_id == job_id,
                            BatchCall.state.in_(("answered", "failed")),
                        )
                    )
                ).tuples()
                if a is not None
            }
            out = []
            for c in waiting:
                keys = json.loads(c.keys)
                if all(k in done for k in keys):
                    mine = {k: done[k] for k in keys}
                    out.append(
                        ReadyCommand(
                            c.command_id, c.task_id, c.instructor, json.loads(c.command), mine
                        )
                    )
            return out

    async def answers(self, job_id: str, keys: Sequence[str]) -> dict[str, BatchAnswer]:
        async with self._db.session() as s:
            rows = await s.execute(
                select(BatchCall.key, BatchCall.answer).where(
                    BatchCall.job_id == job_id,
                    BatchCall.key.in_(list(keys)),
                    BatchCall.answer.is_not(None),
                )
            )
            return {
                k: BatchAnswer.model_validate_json(a) for k, a in rows.tuples() if a is not None
            }

    async def dispatched(self, job_id: str, command_id: str) -> bool:
        async with self._db.write() as s:
            res = await s.execute(
                update(BatchCommand)
                .where(
                    BatchCommand.job_id == job_id,
                    BatchCommand.command_id == command_id,
                    BatchCommand.state == "waiting",
                )
                .values(state="dispatched")
            )
            return bool(res.rowcount)  # type: ignore[attr-defined]

    async def waiting_tasks(self, job_id: str) -> list[str]:
        async with self._db.session() as s:
            rows = await s.execute(
                select(BatchCommand.task_id)
                .where(BatchCommand.job_id == job_id, BatchCommand.state == "waiting")
                .distinct()
            )
            return list(rows.scalars())

    async def keep_alive(self, job_id: str, task_ids: Sequence[str]) -> int:
        if not task_ids:
            return 0
        async with self._db.write() as s:
            res = await s.execute(
                update(Task)
                .where(
                    Task.job_id == job_id,
                    Task.task_id.in_(list(task_ids)),
                    Task.status.in_(("in_flight", "expired")),
                )
                .values(status="in_flight", created_at=datetime.now(UTC))
            )
            return int(res.rowcount)  # type: ignore[attr-defined]

    async def revive(self, job_id: str) -> int:
        async with self._db.write() as s:
            commands = (
                (
                    await s.execute(
                        select(BatchCommand)
                        .where(BatchCommand.job_id == job_id)
                        .order_by(BatchCommand.seq)
                    )
                )
                .scalars()
                .all()
            )
            latest: dict[str, BatchCommand] = {}
            for c in commands:
                latest[c.task_id] = c
            unfinished = set(
                (
                    await s.execute(
                        select(Task.task_id).where(
                            Task.job_id == job_id,
                            Task.task_id.in_(list(latest)),
                            Task.status.in_(("in_flight", "expired")),
                        )
                    )
                ).scalars()
            )
            revived = 0
            for task_id, c in latest.items():
                if task_id in unfinished and c.state == "dispatched":
                    c.state = "waiting"
                    revived += 1
            return revived

    async def unapplied_usage(self, job_id: str) -> tuple[int, float]:
        async with self._db.session() as s:
            done = (
                select(Task.task_id)
                .where(Task.task_id == BatchCall.task_id, Task.status == "done")
                .exists()
            )
            tokens, cost = (
                await s.execute(
                    select(
                        func.coalesce(func.sum(BatchCall.tokens), 0),
                        func.coalesce(func.sum(BatchCall.cost), 0.0),
                    ).where(BatchCall.job_id == job_id, BatchCall.state == "answered", ~done)
                )
            ).one()
            return int(tokens), float(cost)

    async def counts(self, job_id: str) -> dict[str, dict[str, int]]:
        async with self._db.session() as s:
            rows = await s.execute(
                select(BatchSubmission.instructor, BatchSubmission.state, func.count())
                .where(BatchSubmission.job_id == job_id)
                .group_by(BatchSubmission.instructor, BatchSubmission.state)
            )
            out: dict[str, dict[str, int]] = {}
            for inst, state, n in rows.tuples():
                out.setdefault(inst, {})[state] = int(n)
            return out
