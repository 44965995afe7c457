"""``airoboros export``: convert a dataset in the original JSONL to another format.

    airoboros export --input a.jsonl [b.jsonl ...] --format sharegpt --output out.jsonl
    airoboros export --config-path config.yaml --format parquet --output out.parquet

Exit codes follow the CLI's: 0 done; 2 bad usage, a bad config, a missing input or a row
that is not a dataset row (one line naming the file and line); 1 the output could not be
written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def add_export_parser(sub: Any) -> None:
    """Register the ``export`` command on the CLI's subparsers."""
    from airoboros.exports import FORMATS

    ex = sub.add_parser(
        "export",
        help="convert a dataset to sharegpt, alpaca, openai or parquet",
        description="Convert rows in the original airoboros JSONL to another format "
        "(docs/exports.md).",
    )
    ex.add_argument("--input", "-i", nargs="+", metavar="JSONL", help="dataset files")
    ex.add_argument(
        "--config-path", "-c", default=None, help="export this config's output_path instead"
    )
    ex.add_argument("--format", "-f", default=None, help=f"one of {', '.join(FORMATS)}")
    ex.add_argument("--output", "-o", default=None, help="file to write ('-': stdout)")
    ex.add_argument("--debug", action="store_true", help="tracebacks on errors")
    ex.set_defaults(func=cmd_export)


def _read_rows(paths: list[Path]) -> Iterator[Any]:
    from airoboros.exports import ExportError, coerce_row

    for path in paths:
        try:
            fh = path.open(encoding="utf-8")
        except OSError as exc:
            raise ExportError(f"cannot read {path}: {exc.strerror or exc}") from None
        with fh:
            lineno = 0
            try:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        yield coerce_row(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ExportError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                    except ExportError as exc:
                        raise ExportError(f"{path}:{lineno}: {exc}") from None
            except UnicodeDecodeError:
                raise ExportError(f"{path}:{lineno + 1}: not UTF-8 text") from None


def cmd_export(args: argparse.Namespace) -> int:
    from airoboros.cli.codes import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
    from airoboros.exports import FORMATS, ExportError, export_rows, resolve_format

    def fail(message: str, code: int) -> int:
        print(f"airoboros: {message}", file=sys.stderr)
        return code

    if args.format is None:
        return fail(f"give --format, one of {', '.join(FORMATS)}", EXIT_CONFIG)
    try:
        fmt = resolve_format(args.format)
    except ExportError as exc:
        return fail(str(exc), EXIT_CONFIG)
    if args.output is None:
        return fail("give --output PATH (or '-' for stdout)", EXIT_CONFIG)
    if bool(args.input) == bool(args.config_path):
        return fail("give either --input FILE... or --config-path CONFIG", EXIT_CONFIG)
    if args.input:
        paths = [Path(p) for p in args.input]
    else:
        from airoboros.config import load_config

        config = load_config(args.config_path)  # ConfigError: exit 2 in main()
        paths = [Path(config.output_path)]
    for p in paths:
        if not p.is_file():
            what = "input file" if args.input else f"output_path of {args.config_path}"
            return fail(f"{what} not found: {p}", EXIT_CONFIG)

    try:
        if args.output == "-":
            count = export_rows(_read_rows(paths), fmt, sys.stdout.buffer)
            where = "stdout"
        else:
            count = export_rows(_read_rows(paths), fmt, Path(args.output))
            where = args.output
    except ExportError as exc:
        if args.debug:
            raise
        return fail(str(exc), EXIT_CONFIG)
    except OSError as exc:
        if args.debug:
            raise
        return fail(f"could not write {args.output}: {exc}", EXIT_FAILED)
    print(f"exported {count} rows as {fmt} to {where}", file=sys.stderr)
    return EXIT_OK
