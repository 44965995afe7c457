"""``python -m airoboros.lmoe.vllm``: the original's vLLM LMoE server, rebuilt on vLLM's own
multi-LoRA serving with the project's router in front.

    python -m airoboros.lmoe.vllm --model ./llama-2-7b-hf --lmoe-path ./lmoe \\
        [--router-max-samples 1000] [--router-k 25] [--agent-router] \\
        [--host 127.0.0.1] [--port 8000] [--api-keys KEY1,KEY2] [--vllm-arg=--dtype=half]

It starts ``vllm serve MODEL`` (or, without the ``vllm`` executable, ``python -m
vllm.entrypoints.openai.api_server --model MODEL``) on a free loopback port with every
adapter of the LMoE package as a LoRA module (``--enable-lora --lora-modules
<expert>=<path> ... --max-loras N --max-lora-rank R``, R being the largest adapter's ``r``
rounded up to a rank vLLM accepts), waits until its ``GET /v1/models`` lists every expert,
then serves the router on ``--host:--port``: ``model: "auto"`` (or the base model's name,
or no model) is routed to an expert, ``model: "<expert>"`` goes to that LoRA by name.
Unlike the original, adapters are never merged into the weights (no drift, no lock, no
adapter swapped under a running stream): vLLM batches requests of different adapters.

Keys as in ``airoboros.lmoe.api``: the router asks clients for one of ``--api-keys``
(default AIROBOROS_API_KEYS); vLLM answers only to a random key made at start
(``--api-key``) that only the router holds. vLLM is stopped (its whole process group) when
this process ends, on SIGTERM and SIGINT too. Without vLLM installed it says so on stderr
and exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airoboros.lmoe.api import free_loopback_port, front_router

log = logging.getLogger(__name__)

#: the LoRA ranks vLLM's ``--max-lora-rank`` accepts
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
#: default cap on ``--max-loras`` (LoRAs in one batch; the rest wait on the CPU cache)
DEFAULT_MAX_LORAS = 8


class VllmMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    rank: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m airoboros.lmoe.vllm", description=__doc__)
    p.add_argument("--model", "--base-model", "-m", required=True, help="the base model folder")
    p.add_argument(
        "--lmoe-path", "--lmoe", "-l", required=True, help="LMoE package (adapters/, routing_data/)"
    )
    p.add_argument("--router-max-samples", "-s", type=int, default=1000)
    p.add_argument("--router-k", "-k", type=int, default=25)
    p.add_argument("--agent-router", "-a", action="store_true")
    p.add_argument("--host", "-i", default="127.0.0.1")
    p.add_argument("--port", "-p", type=int, default=8000)
    p.add_argument("--api-keys", default=None, help="as for python -m airoboros.lmoe.api")
    p.add_argument(
        "--max-loras",
        type=int,
        default=DEFAULT_MAX_LORAS,
        help="cap on vLLM's --max-loras (default %(default)s; fewer adapters: their number)",
    )
    p.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for vllm (repeat; e.g. --vllm-arg=--dtype=half)",
    )
    p.add_argument(
        "--ready-timeout", type=float, default=1800.0, help="seconds to wait for vLLM to start"
    )
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


def vllm_launcher() -> list[str]:
    """How to start vLLM's OpenAI server: the ``vllm`` executable on PATH (``vllm serve``),
    else the importable package's api_server module; VllmMissing when neither exists."""
    exe = shutil.which("vllm")
    if exe:
        return [exe, "serve"]
    if importlib.util.find_spec("vllm") is not None:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
    raise VllmMissing(
        "vLLM is not installed (no `vllm` executable on PATH and no importable vllm package); "
        "pip install vllm, or use python -m airoboros.lmoe.api"
    )


def lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts that holds an adapter of rank ``r``."""
    for rank in VLLM_LORA_RANKS:
        if r <= rank:
            return rank
    raise ValueError(f"adapter rank {r} is above vLLM's largest --max-lora-rank {rank}")


def read_adapters(lmoe: Path) -> list[Adapter]:
    from airoboros.errors import ConfigError

    root = lmoe / "adapters"
    if not root.is_dir():
        raise ConfigError([f"--lmoe-path: {lmoe} has no adapters/ folder (not an LMoE package)"])
    out = []
    for cfg in sorted(root.glob("*/adapter_config.json")):
        try:
            rank = int(json.loads(cfg.read_text())["r"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError([f"{cfg}: no LoRA rank `r` ({type(exc).__name__}: {exc})"]) from exc
        out.append(Adapter(cfg.parent.name, cfg.parent.resolve(), rank))
    if not out:
        raise ConfigError([f"--lmoe-path: {root} holds no adapter (no */adapter_config.json)"])
    return out


def vllm_command(
    launcher: list[str],
    model: Path,
    model_id: str,
    adapters: list[Adapter],
    port: int,
    key: str,
    max_loras: int,
    extra: list[str],
) -> list[str]:
    ranks = {lora_rank(a.rank) for a in adapters}
    return [
        *launcher,
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        model_id,
        "--api-key",
        key,
        "--enable-lora",
        "--max-loras",
        str(max(1, min(max_loras, len(adapters)))),
        "--max-lora-rank",
        str(max(ranks)),
        "--lora-modules",
        *(f"{a.name}={a.path}" for a in adapters),
        *extra,
    ]


def wait_ready(
    proc: subprocess.Popen[bytes], url: str, key: str, names: set[str], timeout: float
) -> None:
    """Until ``GET url/v1/models`` lists every LoRA name; RuntimeError if vLLM exits or
    the time runs out."""
    import httpx

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with status {proc.returncode} before it was ready")
        try:
            r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5)
            if r.status_code == 200:
                served = {m.get("id") for m in r.json().get("data", [])}
                if names <= served:
                    return
                last = f"missing LoRA modules {sorted(names - served)}"
            else:
                last = f"HTTP {r.status_code}"
        except (httpx.HTTPError, ValueError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    raise RuntimeError(f"vLLM was not ready after {timeout:.0f} s ({last})")


def stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM to vLLM's process group (its engine workers too), SIGKILL after ``grace``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def build_router(args: argparse.Namespace, vllm_port: int, key: str, model_id: str) -> Any:
    return front_router(args, vllm_port, key, str(Path(args.lmoe_path)), model_id)


async def serve_router(app: Any, args: argparse.Namespace, proc: subprocess.Popen[bytes]) -> int:
    """The router until SIGTERM/SIGINT (0) or until vLLM exits (1)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))
    died = False

    async def watch() -> None:
        nonlocal died
        while proc.poll() is None:
            await asyncio.sleep(0.5)
        died = True
        log.error("vLLM exited with status %s; stopping the router", proc.returncode)
        server.should_exit = True

    watcher = asyncio.create_task(watch())
    try:
        await server.serve()
    finally:
        watcher.cancel()
    return 1 if died else 0


def run(args: argparse.Namespace) -> int:
    from airoboros.errors import ConfigError

    launcher = vllm_launcher()
    model, lmoe = Path(args.model), Path(args.lmoe_path)
    if not (model / "config.json").is_file():
        raise ConfigError([f"--model: {model} is not a model folder (no config.json)"])
    adapters = read_adapters(lmoe)
    port = free_loopback_port()
    key = secrets.token_urlsafe(32)
    model_id = model.name
    cmd = vllm_command(launcher, model.resolve(), model_id, adapters, port, key, args.max_loras,
                       args.vllm_arg)  # fmt: skip
    log.info("starting vLLM on 127.0.0.1:%d with %d LoRA adapters", port, len(adapters))
    log.debug("vLLM command: %s", " ".join(c if c != key else "***" for c in cmd))
    # Its own process group, so that stop() reaches vLLM's engine workers too.
    proc = subprocess.Popen(cmd, start_new_session=True)

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}", key, {a.name for a in adapters},
                   args.ready_timeout)  # fmt: skip
        # uvicorn catches SIGTERM while it serves and raises it again once it has shut
        # down: on_term then turns it into SystemExit, so the finally below still runs.
        log.info("vLLM ready; router on %s:%d", args.host, args.port)
        return asyncio.run(serve_router(build_router(args, port, key, model_id), args, proc))
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop(proc)


def main(argv: list[str] | None = None) -> int:
    from airoboros.errors import ConfigError
    from airoboros.logs import setup_logging

    args = parse_args(argv)
    setup_logging(args.debug)
    try:
        return run(args)
    except VllmMissing as exc:
        print(f"airoboros: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"airoboros: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"airoboros: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
