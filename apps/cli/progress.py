"""Progress for long runs: a live table on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from airoboros.report import Pace, cost_to_finish, eta_seconds, format_duration

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
        batches = getattr(st, "batches", None)
        if batches:
            state += f" · batch {batches['open']} open, {batches['done']} done"
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


def project(rows: list[dict[str, Any]], pace: Pace) -> tuple[float | None, float | None]:
    """Add to each running row the cost to finish (its cost per kept row so far times the
    rows missing) and its ETA (the rows missing at the rate it kept rows in this run), as
    ``to_finish`` and ``eta`` (None: no rate yet); return the job's: the sum of the costs
    and the latest ETA (each None if a running category has none)."""
    costs: list[float | None] = []
    etas: list[float | None] = []
    for r in rows:
        rate = pace.rate(r["name"], r["accepted"])
        if r["state"] != "running":
            r["to_finish"] = r["eta"] = None
            continue
        r["to_finish"] = cost_to_finish(r["target"], r["accepted"], r["cost"])
        r["eta"] = eta_seconds(r["target"], r["accepted"], rate)
        costs.append(r["to_finish"])
        etas.append(r["eta"])
    cost = None if None in costs else sum(c or 0.0 for c in costs)
    eta = None if None in etas else max((e or 0.0 for e in etas), default=0.0)
    return cost, eta


def _money(x: float | None) -> str:
    return "?" if x is None else f"${x:.4f}"


class PlainProgress:
    """One log line per instructor whose numbers changed, at most every ``interval`` s."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last = 0.0
        self._seen: dict[str, tuple[Any, ...]] = {}
        self.pace = Pace()

    def __call__(self, gen: Generation) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        ctl: Any = gen.controller
        rows = _rows(gen)
        cost_left, eta = project(rows, self.pace)
        for r in rows:
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
        if any(r["state"] == "running" for r in rows):
            log.info("to finish: %s, ETA %s", _money(cost_left), format_duration(eta))
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
        self.pace = Pace()

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
            "to finish",
            "ETA",
            "",
        ):
            table.add_column(col, justify="right" if col not in ("instructor", "") else "left")
        rows = _rows(gen)
        cost_left, eta = project(rows, self.pace)
        for r in rows:
            running = r["state"] == "running"
            table.add_row(
                r["name"],
                f"{r['accepted']}/{r['target']}",
                *(str(r[k]) for k in _COUNTS[1:]),
                f"{r['tokens']:,}",
                f"${r['cost']:.4f}",
                _money(r["to_finish"]) if running else "",
                format_duration(r["eta"]) if running else "",
                r["state"],
            )
        if ctl is not None:
            table.caption = f"{ctl.requests_per_minute():.1f} requests/min"
            if any(r["state"] == "running" for r in rows):
                table.caption += f" · to finish {_money(cost_left)}, ETA {format_duration(eta)}"
            if window := concurrency_line(gen):
                table.caption += f" · {window}"
        self.live.update(table)

    def close(self) -> None:
        self.live.stop()


def make_progress(force_plain: bool = False) -> PlainProgress | LiveProgress:
    if not force_plain and sys.stderr.isatty():
        return LiveProgress()
    return PlainProgress()
