"""The ``airoboros`` command.

Exit codes: 0 done; 1 the job failed; 2 bad config or usage; 3 the LLM endpoint is
unreachable or refuses the key; 4 the budget ran out (rows kept); 5 incomplete: a category
could not progress (rows kept, the next run resumes it); 130 interrupted.
Every failure is one line on stderr, never a traceback (``--debug`` shows them).
"""

from __future__ import annotations

import argparse
import os
import sys

from airoboros import __version__
from airoboros.cli.codes import (
    EXIT_CONFIG,
    EXIT_ENDPOINT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    fail,
)
from airoboros.cli.cull import cmd_cull_instructions
from airoboros.cli.generate import cmd_generate_instructions, cmd_generate_topics
from airoboros.errors import (
    AiroborosError,
    AuthError,
    ConfigError,
    ConnectError,
    LLMError,
    MissingCredentials,
)
from airoboros.logs import setup_logging


def cmd_migrate(args: argparse.Namespace) -> int:
    from airoboros.migrations import upgrade
    from airoboros.store.sql import normalize_url

    url = args.database_url or os.environ.get("AIROBOROS_DATABASE_URL")
    if not url:
        return fail("give --database-url or set AIROBOROS_DATABASE_URL", EXIT_CONFIG)
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
    from airoboros.cli.exports import add_export_parser

    add_export_parser(sub)
    from airoboros.cli.segment import add_segment_parser

    add_segment_parser(sub)
    from airoboros.cli.train import add_train_parser

    add_train_parser(sub)
    from airoboros.cli.models import add_models_parser

    add_models_parser(sub)
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
        code = fail("interrupted; every stored row is kept, rerun to resume", EXIT_INTERRUPTED)
    except (ConfigError, MissingCredentials) as exc:
        if args.debug:
            raise
        code = fail(str(exc), EXIT_CONFIG)
    except (ConnectError, AuthError) as exc:
        if args.debug:
            raise
        code = fail(str(exc), EXIT_ENDPOINT)
    except (LLMError, AiroborosError) as exc:
        if args.debug:
            raise
        code = fail(str(exc), EXIT_FAILED)
    return code


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
