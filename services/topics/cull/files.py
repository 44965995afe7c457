"""Culling JSONL files: ``airoboros cull-instructions``, resumable beside its output."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from airoboros.config import Config

if TYPE_CHECKING:
    from airoboros.llm import LLMClient
    from airoboros.llm.accounting import Usage
    from airoboros.ports import Embedder


from airoboros.topics.cull.engine import (
    INSTRUCTOR,
    PASS_THROUGH,
    CullCounts,
    CullInputError,
    CullPlan,
    Judge,
    Progress,
    ProgressFn,
    Unit,
    build_plan,
    fingerprint,
    judge_concurrency,
    judge_model,
    load_embedder,
    make_judge_llm,
    read_jsonl,
    run_units,
)
from airoboros.topics.cull.ledger import FileLedger

log = logging.getLogger(__name__)


@dataclass
class CullResult:
    output: Path
    counts: CullCounts
    rows_in: int
    usage: Usage | None = None
    #: row verdicts taken from an earlier, interrupted run
    reused_verdicts: int = 0
    #: units that were already decided when this run started
    resumed_from: int = 0
    units: int = 0
    state_files: list[Path] = field(default_factory=list)


async def cull_files(
    config: Config,
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    embedder: Embedder | None = None,
    llm: LLMClient | None = None,
    threshold: int | None = None,
    on_progress: ProgressFn | None = None,
) -> CullResult:
    """Cull ``inputs`` into ``output`` (see the module docstring), resuming the progress
    kept beside ``output`` when there is one. ``embedder`` and ``llm`` default to the
    config's; an ``llm`` given is not closed here."""
    from airoboros.llm.accounting import Usage

    out = Path(output)
    source = read_jsonl(inputs)
    for p in inputs:
        if Path(p).resolve() == out.resolve():
            raise CullInputError(f"{out}: the output cannot also be an input")
    rows = [s.row for s in source]
    own_llm = llm is None
    client = llm or make_judge_llm(config, judge_model(config))
    try:
        judge = Judge(config, client, threshold=threshold)
        ledger = FileLedger(out, source)
        fp = fingerprint((s.raw for s in source), rows, config, {"judge": judge.settings_key()})
        plan = ledger.load_plan(fp)
        if plan is None:
            if embedder is None and any(r.category not in PASS_THROUGH for r in rows):
                embedder = await asyncio.to_thread(load_embedder, config)
            if embedder is not None:
                plan = await asyncio.to_thread(
                    build_plan, rows, embedder=embedder, config=config, on_progress=on_progress
                )
            else:
                plan = CullPlan([Unit(r.category, [i], judged=False) for i, r in enumerate(rows)])
            plan.fingerprint = fp
            ledger.save_plan(plan)
        ledger.open()
        try:
            resumed_from = ledger.committed
            reused = len(ledger.verdicts)
            if ledger.usage:
                client.meter.preload(
                    INSTRUCTOR,
                    Usage(
                        requests=int(ledger.usage.get("requests", 0)),
                        prompt_tokens=int(ledger.usage.get("prompt_tokens", 0)),
                        completion_tokens=int(ledger.usage.get("completion_tokens", 0)),
                        cost=float(ledger.usage.get("cost", 0.0)),
                    ),
                )

            def usage_now() -> dict[str, float]:
                u = client.meter.by_instructor.get(INSTRUCTOR)
                if u is None:
                    return {}
                return {
                    "requests": u.requests,
                    "prompt_tokens": u.prompt_tokens,
                    "completion_tokens": u.completion_tokens,
                    "cost": u.cost,
                }

            ledger.usage_fn = usage_now
            if resumed_from < len(plan.units):
                if resumed_from:
                    log.info(
                        "resuming: %d of %d decisions already made, %d verdicts kept",
                        resumed_from, len(plan.units), reused,
                    )  # fmt: skip
                if any(u.judged for u in plan.units[resumed_from:]):
                    warning = await client.preflight(judge.model)
                    if warning:
                        log.warning(warning)
                await run_units(
                    plan,
                    rows,
                    judge,
                    ledger,
                    concurrency=judge_concurrency(config),
                    on_progress=on_progress,
                )
            if on_progress is not None:
                on_progress(Progress("done", len(plan.units), len(plan.units), ledger.counts))
        finally:
            ledger.close()
        return CullResult(
            out,
            ledger.counts,
            len(rows),
            client.meter.by_instructor.get(INSTRUCTOR),
            reused,
            resumed_from,
            len(plan.units),
            ledger.state_files,
        )
    finally:
        if own_llm:
            await client.close()


def dry_run_lines(inputs: Iterable[str | Path], output: str | Path) -> list[str]:
    """What a run would do, without embedding or calling the LLM."""
    source = read_jsonl(list(inputs))
    per: dict[str, int] = {}
    for s in source:
        per[s.row.category] = per.get(s.row.category, 0) + 1
    lines = [f"would cull {len(source)} rows into {output}"]
    for name, n in sorted(per.items()):
        what = "passed through" if name in PASS_THROUGH else "clustered and judged"
        lines.append(f"  {name:<26} {n:>6} rows  {what}")
    return lines
