"""The ``airoboros`` command.

Exit codes: 0 done; 1 the job failed; 2 bad config or usage; 3 the LLM endpoint is
unreachable or refuses the key; 4 the budget ran out (rows kept); 5 incomplete: a category
could not progress (rows kept, the next run resumes it); 130 interrupted.
Every failure is one line on stderr, never a traceback (``--debug`` shows them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any

from airoboros import __version__
from airoboros.errors import (
    AiroborosError,
    AuthError,
    ConfigError,
    ConnectError,
    LLMError,
    MissingCredentials,
)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_ENDPOINT, EXIT_BUDGET = 0, 1, 2, 3, 4
EXIT_INCOMPLETE, EXIT_INTERRUPTED = 5, 130


class JsonFormatter(logging.Formatter):
    """One JSON object per line; inside a span, with its ``trace_id`` and ``span_id`` (the
    ids the trace UI shows), and the exception when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        from airoboros.telemetry import log_ids

        out: dict[str, Any] = {
            "ts": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ids = log_ids()
        if ids is not None:
            out["trace_id"], out["span_id"] = ids
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    else:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in (
        "httpx",
        "httpx2",
        "openai",
        "httpcore",
        "httpcore2",
        "sentence_transformers",
        "alembic",
        "faiss",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(message: str, code: int) -> int:
    print(f"airoboros: {message}", file=sys.stderr)
    return code


def _print_plan(plan: Any, config: Any) -> None:
    print(f"job {plan.job_id} -> {plan.output_path}")
    print(
        f"endpoint: {config.resolved_base_url() or 'https://api.openai.com/v1'} ({config.api} API)"
    )
    print(f"store: {plan.database_url}")
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
    from airoboros.config import load_config
    from airoboros.pipeline import Generation, check_credentials, make_plan
    from airoboros.progress import make_progress

    config = load_config(args.config_path)
    plan = make_plan(config)
    if args.dry_run:
        _print_plan(plan, config)
        return EXIT_OK
    check_credentials(config)
    for name, why in plan.skipped.items():
        logging.warning("skipping %s: %s", name, why)
    for w in plan.warnings:
        logging.warning(w)
    if not plan.active:
        return _fail("no instructor to run: add categories under instructors:", EXIT_CONFIG)
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
        return _fail(f"stopped: {result.detail}; every row produced is kept", EXIT_BUDGET)
    if result.status == "incomplete":
        return _fail(
            f"incomplete: {result.detail}; every row is kept, and rerunning the same config "
            "tries the unfinished categories again",
            EXIT_INCOMPLETE,
        )
    return _fail(f"job {result.status}: {result.detail}", EXIT_FAILED)


def summary_lines(result: Any) -> list[str]:
    """The end-of-run summary: totals, then one line per instructor."""
    wasted = sum(st.wasted_tokens for st in result.states.values())
    lines = [
        f"{result.status}: {result.rows} rows in {result.plan.output_path} · "
        f"{result.usage.requests} requests ({result.retries} retried) · "
        f"{result.usage.total_tokens:,} tokens ({wasted:,.0f} bought no kept row) · "
        f"${result.usage.cost:.4f}"
    ]
    for name, s in result.states.items():
        lines.append(
            f"  {name:<26} {s.accepted}/{s.target} accepted, {s.duplicates} duplicates, "
            f"{s.filtered} filtered, {s.refused} refused, {s.unparseable} unparseable, "
            f"{s.truncated} truncated, {s.failures} failures"
        )
    return lines


def cmd_generate_topics(args: argparse.Namespace) -> int:
    from airoboros.config import load_config
    from airoboros.pipeline import check_credentials, make_llm
    from airoboros.topics.topics import resolve_topics

    config = load_config(args.config_path)
    if args.dry_run:
        print(f"would write topics to {config.topics_path}")
        return EXIT_OK
    check_credentials(config)

    async def go() -> list[str]:
        llm = make_llm(config)
        try:
            await llm.preflight(config.model)
            return await resolve_topics(config, llm)
        finally:
            await llm.close()

    topics = asyncio.run(go())
    print(f"{len(topics)} topics in {config.topics_path}", file=sys.stderr)
    return EXIT_OK


def cmd_cull_instructions(args: argparse.Namespace) -> int:
    from airoboros.config import load_config
    from airoboros.errors import BudgetExhausted
    from airoboros.generator import cull
    from airoboros.pipeline import check_credentials

    config = load_config(args.config_path)
    try:
        if args.dry_run:
            print("\n".join(cull.dry_run_lines(args.input, args.output)))
            return EXIT_OK
        check_credentials(config)
        progress = cull.make_cull_progress(force_plain=args.plain)
        try:
            result = asyncio.run(
                cull.cull_files(config, args.input, args.output, on_progress=progress)
            )
        finally:
            progress.close()
    except (cull.CullInputError, cull.CullStateError) as exc:
        return _fail(str(exc), EXIT_CONFIG)
    except BudgetExhausted as exc:
        return _fail(f"stopped: {exc}; every decision so far is kept, rerun to resume", EXIT_BUDGET)
    print("\n".join(cull.summary_lines(result)), file=sys.stderr)
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    from airoboros.migrations import upgrade
    from airoboros.store.sql import normalize_url

    url = args.database_url or os.environ.get("AIROBOROS_DATABASE_URL")
    if not url:
        return _fail("give --database-url or set AIROBOROS_DATABASE_URL", EXIT_CONFIG)
    upgrade(normalize_url(url))
    print("database is at the latest schema", file=sys.stderr)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="airoboros", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"airoboros {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config-path", "-c", default="config.yaml", help="YAML config file")
        sp.add_argument("--dry-run", action="store_true", help="validate and print the plan only")
        sp.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
        sp.add_argument("--plain", action="store_true", help="log lines instead of a live table")

    gi = sub.add_parser("generate-instructions", help="generate the dataset")
    common(gi)
    gi.set_defaults(func=cmd_generate_instructions)
    gt = sub.add_parser("generate-topics", help="generate topics only")
    common(gt)
    gt.set_defaults(func=cmd_generate_topics)
    cu = sub.add_parser("cull-instructions", help="drop near-duplicates and poor rows (LLM judge)")
    common(cu)
    cu.add_argument("--input", nargs="+", required=True, help="JSONL dataset file(s)")
    cu.add_argument("--output", required=True, help="culled JSONL (progress kept beside it)")
    cu.set_defaults(func=cmd_cull_instructions)
    mg = sub.add_parser("migrate", help="run database migrations")
    mg.add_argument("--database-url", default=None)
    mg.add_argument("--debug", action="store_true")
    mg.set_defaults(func=cmd_migrate)
    from airoboros.exports_cli import add_export_parser

    add_export_parser(sub)
    from airoboros.trainer.segment_cli import add_segment_parser

    add_segment_parser(sub)
    from airoboros.trainer.train_cli import add_train_parser

    add_train_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "debug", False))
    from airoboros import telemetry

    # Off unless OTEL_TRACES_EXPORTER asks: a laptop run has no collector.
    telemetry.setup("airoboros-cli", default_on=False)
    try:
        code = int(args.func(args))
    except KeyboardInterrupt:
        code = _fail("interrupted; every stored row is kept, rerun to resume", EXIT_INTERRUPTED)
    except (ConfigError, MissingCredentials) as exc:
        if args.debug:
            raise
        code = _fail(str(exc), EXIT_CONFIG)
    except (ConnectError, AuthError) as exc:
        if args.debug:
            raise
        code = _fail(str(exc), EXIT_ENDPOINT)
    except (LLMError, AiroborosError) as exc:
        if args.debug:
            raise
        code = _fail(str(exc), EXIT_FAILED)
    return code


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
