"""Generator replicas: items/min with 2 generator processes against 1.

The whole deployed pipeline runs as processes (topics, dedupe, N generators) on the
local RabbitMQ, PostgreSQL and Redis, with moto for S3, against the scripted LLM server
answering after 2 s with no rate limit. Each generator may have --per-replica calls in
flight, so a second replica should nearly double throughput (target >= 1.8x).

    .venv/bin/python bench/replicas_bench.py [--window 60] [--per-replica 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fakes.llm_server import Script, ScriptedLLM, ServerThread  # noqa: E402
from tests.integration.services_harness import (  # noqa: E402
    Stack,
    base_env,
    create_database,
    delete_amqp,
    drop_database,
    free_port,
)

JOB = {
    "model": "gpt-4",
    "topics": [f"topic {i}" for i in range(200)],
    "default_batch_size": 5,
    "max_concurrency": 64,
    "instructors": {
        "general": {"count": 100_000},
        "trivia": {"count": 100_000},
        "joke": {"count": 100_000},
        "orca": {"count": 100_000},
    },
}


def measure(replicas: int, args: argparse.Namespace, s3: str, llm_url: str) -> float:
    import subprocess

    name, url = create_database()
    with tempfile.TemporaryDirectory() as tmp:
        env = base_env(url, s3, llm_url)
        env["AIROBOROS_MAX_CONCURRENCY"] = str(args.per_replica)
        subprocess.run(
            [sys.executable, "-c", "from airoboros.cli import entry; entry()", "migrate"],
            env=env,
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        stack = Stack(Path(tmp), env)
        try:
            stack.start("dedupe", "airoboros.dedupe")
            for i in range(replicas):
                stack.start(f"generator{i}", "airoboros.generator")
            stack.start("topics", "airoboros.topics")
            with stack.client() as c:
                job_id = c.post("/v1/jobs", json=JOB).json()["id"]
                time.sleep(args.warmup)
                r0, t0 = c.get(f"/v1/jobs/{job_id}").json()["rows"], time.monotonic()
                time.sleep(args.window)
                r1, t1 = c.get(f"/v1/jobs/{job_id}").json()["rows"], time.monotonic()
                c.post(f"/v1/jobs/{job_id}/cancel")
            rate = (r1 - r0) * 60 / (t1 - t0)
            print(
                f"{replicas} generator(s): {r1 - r0} rows in {t1 - t0:.1f}s = {rate:.0f} items/min",
                flush=True,
            )
            return rate
        finally:
            stack.stop_all()
            drop_database(name)
            delete_amqp(env["AIROBOROS_AMQP_PREFIX"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=float, default=60.0)
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--latency", type=float, default=2.0)
    p.add_argument("--per-replica", type=int, default=8)
    args = p.parse_args()
    from moto.server import ThreadedMotoServer

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    try:
        with ServerThread(ScriptedLLM(Script(latency=args.latency))) as srv:
            one = measure(1, args, f"127.0.0.1:{port}", srv.base_url)
            two = measure(2, args, f"127.0.0.1:{port}", srv.base_url)
    finally:
        moto.stop()
    print(
        f"replicas: 2 generators / 1 generator = {two / one:.2f}x (target >= 1.8x), {args.per_replica} calls per replica, {args.latency}s latency"
    )


if __name__ == "__main__":
    main()
