"""Durable progress of a cull (the engine's ``Ledger``): beside the output file for the
command line (``FileLedger``), in the object store and the SQL store for the topics API's
cull step (``StoreLedger``)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airoboros.store import StoredItem
    from airoboros.topics.service import TopicsService

    pass


from airoboros.topics.cull.engine import (
    CullCounts,
    CullInputError,
    CullPlan,
    CullRow,
    CullStateError,
    Decision,
    SourceLine,
    Verdict,
)

log = logging.getLogger(__name__)


def _fsync(f: IO[Any]) -> None:
    f.flush()
    os.fsync(f.fileno())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        _fsync(f)
    os.replace(tmp, path)


class FileLedger:
    """Progress beside the output: ``<output>.cull-plan.json`` (the clusters, written once)
    and ``<output>.cull-journal`` (JSON lines: verdicts as they arrive, and after each
    batch of decisions the output's length, the counts and the usage so far).

    A commit appends rows to the output and fsyncs it before the journal records the new
    length; a resume truncates the output to the last recorded length, so rows written
    after it (by a run killed before recording them) are written again exactly once."""

    def __init__(self, output: Path, source: Sequence[SourceLine]) -> None:
        self.output = output
        self.plan_path = output.with_name(output.name + ".cull-plan.json")
        self.journal_path = output.with_name(output.name + ".cull-journal")
        self.source = source
        self.committed = 0
        self.verdicts: dict[int, Verdict] = {}
        self.counts = CullCounts()
        self.usage: dict[str, float] = {}
        self.usage_fn: Callable[[], dict[str, float]] | None = None
        self._offset = 0
        self._out: IO[bytes] | None = None
        self._journal: IO[bytes] | None = None

    @property
    def state_files(self) -> list[Path]:
        return [self.plan_path, self.journal_path]

    def load_plan(self, fingerprint: str) -> CullPlan | None:
        """The stored plan, None when there is none. Raises CullStateError when it was
        made from other inputs or settings, or when the output is not the one it wrote."""
        if not self.plan_path.exists():
            if self.output.exists() and self.output.stat().st_size > 0:
                raise CullInputError(
                    f"{self.output}: exists and holds rows this cull did not write; "
                    "remove it or choose another --output"
                )
            return None
        try:
            plan = CullPlan.from_json(json.loads(self.plan_path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as exc:
            raise CullStateError(
                f"{self.plan_path}: unreadable ({exc}); delete it, {self.journal_path.name} "
                "and the output to start over"
            ) from None
        if plan.fingerprint != fingerprint:
            raise CullStateError(
                f"{self.plan_path}: a cull with other inputs or settings was started here; "
                f"rerun it as it was, or delete {self.plan_path.name}, "
                f"{self.journal_path.name} and {self.output.name} to start over"
            )
        return plan

    def save_plan(self, plan: CullPlan) -> None:
        self.journal_path.unlink(missing_ok=True)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.plan_path, json.dumps(plan.to_json()).encode())

    def open(self) -> None:
        """Replay the journal, then truncate the output to its last committed length."""
        good_len = 0
        if self.journal_path.exists():
            with self.journal_path.open("rb") as f:
                for raw in f:
                    try:
                        rec = json.loads(raw)
                    except ValueError:
                        break  # a line torn by the kill: everything after it is dropped
                    if not raw.endswith(b"\n"):
                        break
                    good_len += len(raw)
                    if "v" in rec:
                        self.verdicts[int(rec["v"])] = Verdict(bool(rec["g"]), rec.get("e"))
                    elif "c" in rec:
                        self.committed = int(rec["c"])
                        self._offset = int(rec["o"])
                        self.counts = CullCounts.from_json(rec["n"])
                        self.usage = dict(rec.get("u") or {})
        self._journal = self.journal_path.open("ab")
        self._journal.truncate(good_len)
        if not self.output.exists():
            self.output.touch()
        size = self.output.stat().st_size
        if size < self._offset:
            raise CullStateError(
                f"{self.output}: shorter than the rows already committed to it; it was "
                f"changed since. Delete it with {self.plan_path.name} and "
                f"{self.journal_path.name} to start over"
            )
        self._out = self.output.open("r+b")
        self._out.truncate(self._offset)
        self._out.seek(self._offset)

    def close(self) -> None:
        for f in (self._out, self._journal):
            if f is not None:
                f.close()
        self._out = self._journal = None

    def _append(self, rec: dict[str, Any], *, sync: bool) -> None:
        assert self._journal is not None
        self._journal.write((json.dumps(rec, separators=(",", ":")) + "\n").encode())
        if sync:
            _fsync(self._journal)
        else:
            self._journal.flush()

    async def record_verdict(self, index: int, verdict: Verdict) -> None:
        rec: dict[str, Any] = {"v": index, "g": int(verdict.good)}
        if verdict.error is not None:
            rec["e"] = verdict.error
        self._append(rec, sync=False)

    async def commit(self, decisions: Sequence[Decision]) -> None:
        assert self._out is not None
        data = b"".join(
            (self.source[i].output_line() + "\n").encode() for d in decisions for i in d.write
        )
        if data:
            self._out.write(data)
            _fsync(self._out)
            self._offset += len(data)
        for d in decisions:
            d.apply(self.counts)
        self.committed = decisions[-1].unit + 1
        rec: dict[str, Any] = {"c": self.committed, "o": self._offset, "n": self.counts.to_json()}
        if self.usage_fn is not None:
            rec["u"] = self.usage_fn()
        self._append(rec, sync=True)


class StoreLedger:
    """A cull job's progress: the plan and ``progress.json`` in the object store, the
    kept rows in the SQL store (one per cluster, by source_id)."""

    def __init__(
        self,
        svc: TopicsService,
        job_id: str,
        items: Sequence[StoredItem],
        rows: Sequence[CullRow],
        save_every: float = 2.0,
    ) -> None:
        self.svc = svc
        self.job_id = job_id
        self.items = items
        self.rows = rows
        self.prefix = f"jobs/{job_id}/cull"
        self.save_every = save_every
        self.committed = 0
        self.verdicts: dict[int, Verdict] = {}
        self.counts = CullCounts()
        self.plan: CullPlan | None = None
        self._saved_at = 0.0
        self._saved = -1

    async def load_plan(self, fp: str) -> CullPlan | None:
        key = f"{self.prefix}/plan.json"
        if not await self.svc.objects.exists(key):
            return None
        plan = CullPlan.from_json(json.loads(await self.svc.objects.get_bytes(key)))
        if plan.fingerprint != fp:
            raise CullStateError(
                "the source job's rows or the cull settings changed since this cull started"
            )
        return plan

    async def save_plan(self, plan: CullPlan) -> None:
        await self.svc.objects.put_bytes(
            f"{self.prefix}/plan.json", json.dumps(plan.to_json()).encode()
        )

    async def open(self) -> None:
        key = f"{self.prefix}/progress.json"
        if not await self.svc.objects.exists(key):
            return
        data = json.loads(await self.svc.objects.get_bytes(key))
        self.committed = int(data["committed"])
        self.counts = CullCounts.from_json(data["counts"])
        self.verdicts = {int(k): Verdict(bool(g), e) for k, (g, e) in data["verdicts"].items()}
        self._saved = self.committed

    async def save(self) -> None:
        """Write the progress (the rows of every decision counted in it are already in
        the store, so a resume from it repeats no row)."""
        if self._saved == self.committed and self._saved_at:
            return
        data = {
            "committed": self.committed,
            "counts": self.counts.to_json(),
            "verdicts": {str(k): [int(v.good), v.error] for k, v in self.verdicts.items()},
        }
        await self.svc.objects.put_bytes(f"{self.prefix}/progress.json", json.dumps(data).encode())
        self._saved = self.committed
        self._saved_at = time.monotonic()

    async def record_verdict(self, index: int, verdict: Verdict) -> None:
        pass  # saved with the next progress

    async def commit(self, decisions: Sequence[Decision]) -> None:
        assert self.plan is not None
        batch = []
        for d in decisions:
            # One source_id per decision: a decision repeated after a crash (whose judge may
            # pick another member) still writes at most one row.
            leader = self.items[self.plan.units[d.unit].members[0]].seq
            for i in d.write:
                item = self.items[i].item
                if item.category != self.rows[i].category:  # a legacy category name
                    item = item.model_copy(update={"category": self.rows[i].category})
                batch.append((f"cull:{leader}", item))
        await self.svc.store.rows.add(self.job_id, batch, cap=False)
        for d in decisions:
            d.apply(self.counts)
        self.committed = decisions[-1].unit + 1
        if time.monotonic() - self._saved_at >= self.save_every:
            await self.save()
