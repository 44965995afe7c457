"""Progress for long runs: a live table on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airoboros.cli.embedded import Generation

log = logging.getLogger("airoboros.progress")


def _rows(gen: Generation) -> list[dict[str, Any]]:
    ctl: Any = gen.controller
    if ctl is None or gen.llm is None:
        return []
    meter = gen.llm.meter
    out = []
    for st in ctl.snapshot():
        u = meter.by_instructor.get(st.name)
        if st.stalled:
            state = "stopped"
        elif st.skipped:
            state = "skipped"
        else:
            state = "done" if st.done else "running"
        out.append(
            {
                "name": st.name,
                "accepted": st.accepted,
                "target": st.target,
                "duplicates": st.duplicates,
                "filtered": st.filtered,
                "refused": st.refused,
                "unparseable": st.unparseable,
                "truncated": st.truncated,
                "failures": st.failures,
                "retries": st.retries,
                "tokens": u.total_tokens if u else 0,
                "cost": u.cost if u else 0.0,
                "state": state,
            }
        )
    return out


def concurrency_line(gen: Generation) -> str:
    """``concurrency 12/64 (adaptive)`` while the adaptive window limits the calls in
    flight (window/max_concurrency), else ``""``."""
    limiter: Any = gen.llm.limiter if gen.llm is not None else None
    window = limiter.concurrency_window() if limiter is not None else None
    if window is None:
        return ""
    return f"concurrency {window}/{limiter.max_concurrency} (adaptive)"


_COUNTS = (
    "accepted",
    "duplicates",
    "filtered",
    "refused",
    "unparseable",
    "truncated",
    "failures",
    "retries",
)


class PlainProgress:
    """One log line per instructor whose numbers changed, at most every ``interval`` s."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last = 0.0
        self._seen: dict[str, tuple[Any, ...]] = {}

    def __call__(self, gen: Generation) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        ctl: Any = gen.controller
        for r in _rows(gen):
            key = (*(r[k] for k in _COUNTS), r["state"])
            if self._seen.get(r["name"]) == key:
                continue
            self._seen[r["name"]] = key
            log.info(
                "%s: %d/%d accepted, %d duplicates, %d filtered, %d refused, %d unparseable, "
                "%d truncated, %d failures, %d retries, %d tokens, $%.4f (%s)",
                r["name"], r["accepted"], r["target"], *(r[k] for k in _COUNTS[1:]),
                r["tokens"], r["cost"], r["state"],
            )  # fmt: skip
        if ctl is not None:
            log.info("requests/min: %.1f", ctl.requests_per_minute())
        if window := concurrency_line(gen):
            log.info("%s", window)

    def close(self) -> None:
        pass


class LiveProgress:
    """A rich table redrawn in place."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console(stderr=True)
        self.live = Live(console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def __call__(self, gen: Generation) -> None:
        from rich.table import Table

        ctl: Any = gen.controller
        table = Table(title=f"airoboros · {gen.config.output_path}", expand=False)
        for col in (
            "instructor",
            "accepted/target",
            "dup",
            "filtered",
            "refused",
            "unparsed",
            "cut off",
            "fail",
            "retries",
            "tokens",
            "cost",
            "",
        ):
            table.add_column(col, justify="right" if col not in ("instructor", "") else "left")
        for r in _rows(gen):
            table.add_row(
                r["name"],
                f"{r['accepted']}/{r['target']}",
                *(str(r[k]) for k in _COUNTS[1:]),
                f"{r['tokens']:,}",
                f"${r['cost']:.4f}",
                r["state"],
            )
        if ctl is not None:
            table.caption = f"{ctl.requests_per_minute():.1f} requests/min"
            if window := concurrency_line(gen):
                table.caption += f" · {window}"
        self.live.update(table)

    def close(self) -> None:
        self.live.stop()


def make_progress(force_plain: bool = False) -> PlainProgress | LiveProgress:
    if not force_plain and sys.stderr.isatty():
        return LiveProgress()
    return PlainProgress()
