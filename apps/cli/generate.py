"""``airoboros generate-instructions`` and ``airoboros generate-topics``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from airoboros.cli.codes import (
    EXIT_BUDGET,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INCOMPLETE,
    EXIT_OK,
    fail,
)


def print_plan(plan: Any, config: Any) -> None:
    print(f"job {plan.job_id} -> {config.output_path}")
    print(
        f"endpoint: {config.resolved_base_url() or 'https://api.openai.com/v1'} ({config.api} API)"
    )
    print(f"store: {config.resolved_database_url()}")
    for name in plan.active:
        print(
            f"  {name:<26} count {plan.targets[name]:>5}  batch {config.batch_size_for(name):>3}"
            f"  phase {plan.phases.get(name, 'main'):<10}  model {config.model_for(name)}"
        )
    for name, why in plan.skipped.items():
        print(f"  {name:<26} skipped: {why}")
    for w in plan.warnings:
        print(f"warning: {w}")


def cmd_generate_instructions(args: argparse.Namespace) -> int:
    from airoboros.cli.embedded import Generation, check_credentials, plan_for
    from airoboros.cli.progress import make_progress
    from airoboros.config import load_config

    config = load_config(args.config_path)
    plan = plan_for(config)
    if args.dry_run:
        print_plan(plan, config)
        return EXIT_OK
    check_credentials(config)
    for name, why in plan.skipped.items():
        logging.warning("skipping %s: %s", name, why)
    for w in plan.warnings:
        logging.warning(w)
    if not plan.active:
        return fail("no instructor to run: add categories under instructors:", EXIT_CONFIG)
    progress = make_progress(force_plain=args.plain)
    gen = Generation(config, on_progress=progress)
    try:
        result = asyncio.run(gen.run())
    finally:
        progress.close()
    print("\n".join(summary_lines(result)), file=sys.stderr)
    if result.status == "done":
        return EXIT_OK
    if result.status == "budget_exhausted":
        return fail(f"stopped: {result.detail}; every row produced is kept", EXIT_BUDGET)
    if result.status == "incomplete":
        return fail(
            f"incomplete: {result.detail}; every row is kept, and rerunning the same config "
            "tries the unfinished categories again",
            EXIT_INCOMPLETE,
        )
    return fail(f"job {result.status}: {result.detail}", EXIT_FAILED)


def summary_lines(result: Any) -> list[str]:
    """The end-of-run summary: totals, then the quality report's table, one line per
    category (airoboros.report; per instructor counts if there is no report)."""
    wasted = sum(st.wasted_tokens for st in result.states.values())
    lines = [
        f"{result.status}: {result.rows} rows in {result.output_path} · "
        f"{result.usage.requests} requests ({result.retries} retried) · "
        f"{result.usage.total_tokens:,} tokens ({wasted:,.0f} bought no kept row) · "
        f"${result.usage.cost:.4f}"
    ]
    report = getattr(result, "report", None)
    if report is not None:
        from airoboros.report import report_table

        lines.extend(report_table(report))
        if result.report_path is not None:
            lines.append(f"quality report: {result.report_path}")
        return lines
    for name, s in result.states.items():
        lines.append(
            f"  {name:<26} {s.accepted}/{s.target} accepted, {s.duplicates} duplicates, "
            f"{s.filtered} filtered, {s.refused} refused, {s.unparseable} unparseable, "
            f"{s.truncated} truncated, {s.failures} failures"
        )
    return lines


def cmd_generate_topics(args: argparse.Namespace) -> int:
    from airoboros.cli.embedded import check_credentials
    from airoboros.config import load_config
    from airoboros.llm.factory import make_llm
    from airoboros.topics.topics import FileTopics, resolve_topics

    config = load_config(args.config_path)
    if args.dry_run:
        print(f"would write topics to {config.topics_path}")
        return EXIT_OK
    check_credentials(config)

    async def go() -> list[str]:
        llm = make_llm(config)
        try:
            await llm.preflight(config.model)
            return await resolve_topics(config, llm, FileTopics(config.topics_path))
        finally:
            await llm.close()

    topics = asyncio.run(go())
    print(f"{len(topics)} topics in {config.topics_path}", file=sys.stderr)
    return EXIT_OK
