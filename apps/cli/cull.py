"""``airoboros cull-instructions``: live progress, the summary, and the command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


from airoboros.cli.codes import EXIT_BUDGET, EXIT_CONFIG, EXIT_OK, fail
from airoboros.topics.cull.engine import (
    Progress,
)
from airoboros.topics.cull.files import CullResult

log = logging.getLogger("airoboros.cull")

# --- progress and summary for the command line --------------------------------------------


class PlainCullProgress:
    """A log line at most every ``interval`` seconds (and at each phase's end)."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last = 0.0

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if now - self._last < self.interval and p.done < p.total and p.phase != "done":
            return
        self._last = now
        tail = f" · {p.counts.summary()}" if p.counts is not None else ""
        log.info("cull %s: %d/%d%s", p.phase, p.done, p.total, tail)

    def close(self) -> None:
        pass


class LiveCullProgress:
    """A rich progress bar per phase, redrawn in place."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[detail]}"),
            console=Console(stderr=True),
        )
        self.bar.start()
        self.tasks: dict[str, Any] = {}

    def __call__(self, p: Progress) -> None:
        phase = "judging" if p.phase == "done" else p.phase
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task(phase, total=p.total, detail="")
        detail = p.counts.summary() if p.counts is not None else ""
        self.bar.update(self.tasks[phase], completed=p.done, total=p.total, detail=detail)

    def close(self) -> None:
        self.bar.stop()


def make_cull_progress(force_plain: bool = False) -> PlainCullProgress | LiveCullProgress:
    if not force_plain and sys.stderr.isatty():
        return LiveCullProgress()
    return PlainCullProgress()


def summary_lines(result: CullResult) -> list[str]:
    t = result.counts.total()
    u = result.usage
    lines = [
        f"done: {t.kept + t.passed} of {result.rows_in} rows in {result.output} · "
        f"kept {t.kept}, dropped {t.dropped}, passed through {t.passed}, "
        f"judge errors {t.judge_errors}"
        + (
            f" · {u.requests} requests · {u.total_tokens:,} tokens · ${u.cost:.4f}"
            if u is not None
            else ""
        )
    ]
    if result.resumed_from:
        lines.append(
            f"  resumed at decision {result.resumed_from} of {result.units} "
            f"({result.reused_verdicts} verdicts reused)"
        )
    for name, c in sorted(result.counts.by_category.items()):
        if c.passed:
            lines.append(f"  {name:<26} {c.passed} passed through")
        else:
            lines.append(
                f"  {name:<26} {c.clusters} clusters: {c.kept} kept, {c.dropped} dropped, "
                f"{c.judge_errors} judge errors"
            )
    return lines


def cmd_cull_instructions(args: argparse.Namespace) -> int:
    from airoboros.cli.embedded import check_credentials
    from airoboros.config import load_config
    from airoboros.errors import BudgetExhausted
    from airoboros.topics.cull import engine, files

    config = load_config(args.config_path)
    try:
        if args.dry_run:
            print("\n".join(files.dry_run_lines(args.input, args.output)))
            return EXIT_OK
        check_credentials(config)
        progress = make_cull_progress(force_plain=args.plain)
        try:
            result = asyncio.run(
                files.cull_files(config, args.input, args.output, on_progress=progress)
            )
        finally:
            progress.close()
    except (engine.CullInputError, engine.CullStateError) as exc:
        return fail(str(exc), EXIT_CONFIG)
    except BudgetExhausted as exc:
        return fail(f"stopped: {exc}; every decision so far is kept, rerun to resume", EXIT_BUDGET)
    print("\n".join(summary_lines(result)), file=sys.stderr)
    return EXIT_OK
