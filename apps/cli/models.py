"""``airoboros models``: base models for training and serving.

    airoboros models import-gguf PATH --output DIR [--dtype float32|bfloat16] [--no-answer-check]

``import-gguf`` turns a GGUF file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf) into a Hugging Face
folder (safetensors, config.json, generation_config.json and a tokenizer rebuilt from the
GGUF's own vocabulary), prints each check it made and exits 0; a failed check is one line on
stderr and exit 1 (docs/trainer.md, "Real weights").
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from airoboros.cli.codes import EXIT_FAILED, EXIT_OK, fail


def add_models_parser(sub: Any) -> None:
    mo = sub.add_parser("models", help="base models: import a GGUF file as a Hugging Face folder")
    msub = mo.add_subparsers(dest="models_command", required=True)
    im = msub.add_parser(
        "import-gguf",
        help="convert a GGUF file to a Hugging Face folder and verify it",
        description="Dequantize a GGUF model into safetensors, rebuild its tokenizer from the "
        "GGUF vocabulary, and verify ids, round trips and a greedy answer.",
    )
    im.add_argument("path", help="the .gguf file")
    im.add_argument("--output", required=True, help="folder to write (replaced if it exists)")
    im.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    im.add_argument(
        "--no-answer-check",
        action="store_true",
        help="skip the greedy 'capital of France' answer check (for non-chat models)",
    )
    im.add_argument("--debug", action="store_true", help="tracebacks on failure")
    im.set_defaults(func=cmd_import_gguf)


def cmd_import_gguf(args: argparse.Namespace) -> int:
    from airoboros.trainer.gguf import ImportCheckFailed, import_gguf

    start = time.monotonic()

    def progress(msg: str) -> None:
        print(f"[{time.monotonic() - start:5.1f}s] {msg}", file=sys.stderr, flush=True)

    try:
        report = import_gguf(
            args.path,
            args.output,
            dtype=args.dtype,
            answer_check=not args.no_answer_check,
            progress=progress,
        )
    except ImportCheckFailed as exc:
        if args.debug:
            raise
        return fail(f"import-gguf: {exc}", EXIT_FAILED)
    print(f"wrote {report.output} ({report.dtype}); {len(report.checks)} checks passed")
    return EXIT_OK
