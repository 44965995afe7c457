"""The JSONL output file, kept in step with the SQL store (which is the source of truth).

Rows are appended in store order and fsynced per batch. On start, ``reconcile`` cuts a
torn last line and appends any rows the store has but the file lacks (a crash between
the commit and the write), so after a SIGKILL the file is exact: nothing lost, nothing
twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from airoboros.store import RowRepository, StoredItem


def _dump(item: StoredItem) -> str:
    return json.dumps(item.item.to_row(), ensure_ascii=False) + "\n"


class JsonlSink:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, items: Iterable[StoredItem]) -> None:
        lines = [_dump(i) for i in items]
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())

    def complete_lines(self) -> int:
        """Count whole lines, first cutting a torn (unterminated) last line."""
        if not self.path.exists():
            return 0
        with self.path.open("rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                cut = data.rfind(b"\n") + 1
                f.truncate(cut)
                data = data[:cut]
        return data.count(b"\n")

    async def reconcile(self, rows: RowRepository, job_id: str) -> int:
        """Append the rows the store holds beyond the file's line count; returns how many."""
        have = self.complete_lines()
        total = await rows.count(job_id)
        if have >= total:
            return 0
        missing: list[StoredItem] = []
        index = 0
        async for it in rows.iterate(job_id):
            index += 1
            if index > have:
                missing.append(it)
        self.write(missing)
        return len(missing)

    def read_rows(self) -> list[dict[str, object]]:
        if not self.path.exists():
            return []
        rows = []
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{self.path}:{n}: not valid JSON ({exc.msg})") from None
            rows.append(row)
        return rows
