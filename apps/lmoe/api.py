"""``python -m airoboros.lmoe.api``: the original's one-process LMoE server, rebuilt on the
router and inference services.

    python -m airoboros.lmoe.api --base-model ./llama-2-7b-hf --lmoe ./lmoe \\
        [--router-max-samples 1000] [--router-k 25] [--agent-router] \\
        [--host 127.0.0.1] [--port 8000] [--api-keys KEY1,KEY2] \\
        [--prompt-format airoboros|chat-template|auto]

The inference service serves the base model with every adapter of the LMoE package on a
loopback port; the router serves the OpenAI API on ``--host:--port`` in front of it and
routes each request to an expert (``model: "auto"``, the base model's name, or no
model), or to the one named (``model: "<expert>"`` or the original's ``expert`` field).
Both run in this one process, so the original's instructions still work; everything
else (streaming, batching across experts, adapters added without a restart) is the
services'.

Keys: the router asks clients for one of the ``--api-keys`` (without the flag, those of
AIROBOROS_API_KEYS; neither: none); the inference port answers only to a random key made
at start that only the router holds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m airoboros.lmoe.api", description=__doc__)
    p.add_argument("--base-model", "-b", required=True, help="local path of the base model")
    p.add_argument("--lmoe", "-l", required=True, help="LMoE package (adapters/, routing_data/)")
    p.add_argument("--router-max-samples", "-s", type=int, default=1000)
    p.add_argument("--router-k", "-k", type=int, default=25)
    p.add_argument(
        "--agent-router", "-a", action="store_true", help="route via the function expert"
    )
    p.add_argument("--host", "-i", default="127.0.0.1")
    p.add_argument("--port", "-p", type=int, default=8000)
    p.add_argument(
        "--api-keys",
        default=None,
        help="comma-separated Bearer keys the router accepts from clients (default: the "
        "AIROBOROS_API_KEYS environment variable; the flag wins over it, --api-keys '' "
        "for none; neither set: no key needed)",
    )
    p.add_argument(
        "--prompt-format",
        choices=("airoboros", "chat-template", "auto"),
        default="airoboros",
        help="how chat messages become a prompt: airoboros (default: the format the experts "
        "were trained on), chat-template (the base model's tokenizer template), auto (the "
        "template when the tokenizer has one)",
    )
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client_keys(args: argparse.Namespace) -> str:
    """The one source of the router's client keys: ``--api-keys`` when given (even
    empty), else AIROBOROS_API_KEYS."""
    if args.api_keys is not None:
        return str(args.api_keys)
    return os.environ.get("AIROBOROS_API_KEYS", "")


def front_router(
    args: argparse.Namespace, backend_port: int, backend_key: str, lmoe: str, model_id: str
) -> Any:
    """The router app in front of one loopback backend (our inference service, or vLLM
    for ``airoboros.lmoe.vllm``), with the original's router flags."""
    from airoboros.router.app import create_app as router_app
    from airoboros.router.settings import RouterSettings

    return router_app(
        RouterSettings(
            host=args.host,
            port=args.port,
            backends=f"http://127.0.0.1:{backend_port}",
            backend_api_key=backend_key,
            lmoe=lmoe,
            base_models=model_id,
            router_k=args.router_k,
            router_max_samples=args.router_max_samples,
            agent_router=args.agent_router,
            api_keys=client_keys(args),
            bus=False,
        )
    )


def build(args: argparse.Namespace, inference_port: int) -> tuple[Any, Any]:
    """The inference app and the router app of one LMoE process.

    Both settings get their keys explicitly (init values win over the environment): the
    router the client keys of ``client_keys``, the inference app a fresh random key that
    only the router knows (it sends it as ``Authorization: Bearer`` to its backend), so
    nothing else on the host reaches the inference port without it."""
    from airoboros.errors import ConfigError
    from airoboros.inference.app import create_app as inference_app
    from airoboros.inference.settings import InferenceSettings

    base, lmoe = Path(args.base_model), Path(args.lmoe)
    if not (base / "config.json").is_file():
        raise ConfigError([f"--base-model: {base} is not a model folder (no config.json)"])
    if not (lmoe / "adapters").is_dir():
        raise ConfigError([f"--lmoe: {lmoe} has no adapters/ folder (not an LMoE package)"])
    model_id = base.name
    internal_key = secrets.token_urlsafe(32)
    inference = inference_app(
        InferenceSettings(
            host="127.0.0.1",
            port=inference_port,
            base_model=str(base),
            model_id=model_id,
            lmoe_paths=str(lmoe),
            adapter_roots=str(lmoe),
            api_keys=internal_key,
            prompt_format=getattr(args, "prompt_format", "airoboros"),
        )
    )
    router = front_router(args, inference_port, internal_key, str(lmoe), model_id)
    return inference, router


async def serve(args: argparse.Namespace) -> None:
    # Both apps load models in worker threads at start-up; Python imports of transformers'
    # lazy modules are not safe from two threads at once, so import them here first.
    import peft  # noqa: F401
    import sentence_transformers  # noqa: F401
    import uvicorn
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    port = free_loopback_port()
    inference, router = build(args, port)
    servers = [
        uvicorn.Server(uvicorn.Config(inference, host="127.0.0.1", port=port, log_level="warning")),
        uvicorn.Server(uvicorn.Config(router, host=args.host, port=args.port, log_level="info")),
    ]
    log.info("LMoE: router on %s:%d, inference on 127.0.0.1:%d", args.host, args.port, port)
    await asyncio.gather(*(s.serve() for s in servers))


def main(argv: list[str] | None = None) -> int:
    from airoboros.errors import ConfigError
    from airoboros.logs import setup_logging

    args = parse_args(argv)
    setup_logging(args.debug)
    from airoboros import telemetry

    telemetry.setup("airoboros-lmoe", default_on=False)
    try:
        asyncio.run(serve(args))
    except ConfigError as exc:
        print(f"airoboros: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
