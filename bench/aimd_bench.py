"""Adaptive concurrency (AIMD): throughput and 429 share against a hidden capacity.

For each K, a capacity server (tests/fakes/capacity_server.py, in its own process)
answers at most K chat completions at once, each after --latency seconds, and answers
429 without any rate-limit header beyond that. The real LLMClient (real openai SDK,
real HTTP), with max_concurrency --max-concurrency and the adaptive window on (the
default where no limits are configured), keeps --max-concurrency calls pending for
--duration seconds. The best a client can do is K/latency calls a second.

Reported per K: calls/s in the steady state (after --warmup seconds) as a fraction of
K/latency (target >= 0.9), the same over the whole run (slow start included), and the
share of all requests the server answered 429 (target <= 2%; also after warm-up alone:
the first doubling past K costs up to ~K refusals once), with the window at the end. Beside it, in the same run, the oracle: the same client with the window off and
max_concurrency K, as if it had been told K (its calls/s is what this machine's client
can do at K; "aimd / oracle" separates the algorithm from the machine's CPU). With
--baseline, also the same run with the window off (a fixed max_concurrency that
pauses everyone on each 429), the behaviour before adaptive concurrency.

    .venv/bin/python bench/aimd_bench.py [--ks 4,16,64] [--latency 0.2] [--duration 20]
                                         [--latencies 0.2,0.2,0.5] [--warmup 5]
                                         [--max-concurrency 128] [--baseline]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from airoboros.llm import LLMClient, LLMSettings, RateLimiter, UsageMeter  # noqa: E402

MSG = [{"role": "user", "content": "Say something about lighthouses."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(k: int, latency: float) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fakes.capacity_server",
            "--port",
            str(port),
            "--capacity",
            str(k),
            "--latency",
            str(latency),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            stats(url)
            return proc, url
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the capacity server did not start") from None
            time.sleep(0.1)


def stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/stats", timeout=5) as r:
        return dict(json.loads(r.read()))


async def run(
    url: str, args: argparse.Namespace, adaptive: bool, concurrency: int
) -> dict[str, Any]:
    limiter = RateLimiter(max_concurrency=concurrency, adaptive_concurrency=adaptive)
    client = LLMClient(LLMSettings(base_url=f"{url}/v1", api_key="k"), limiter, UsageMeter())
    done: list[float] = []
    failed = 0
    start = time.monotonic()
    stop = start + args.duration

    async def worker() -> None:
        nonlocal failed
        while time.monotonic() < stop:
            try:
                await client.complete(MSG, model="test-model", instructor="bench")
            except Exception:
                failed += 1
                continue
            done.append(time.monotonic())

    async def snapshot() -> dict[str, Any]:
        await asyncio.sleep(args.warmup)
        return await asyncio.to_thread(stats, url)

    at_warmup = asyncio.ensure_future(snapshot())
    workers = [asyncio.ensure_future(worker()) for _ in range(args.max_concurrency)]
    try:
        # Calls still retrying well after the end are cut (the baseline's pauses).
        _, late = await asyncio.wait(workers, timeout=args.duration + 10)
        for w in late:
            w.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    finally:
        await client.close()
    end = time.monotonic()
    steady = [t for t in done if start + args.warmup <= t <= stop]
    return {
        "ok": len(done),
        "failed": failed,
        "steady_rate": len(steady) / max(1e-9, stop - start - args.warmup),
        "overall_rate": len(done) / (end - start),
        "window": limiter.concurrency_window(),
        "client_429": client.stats.rate_limited,
        "at_warmup": await at_warmup,
    }


def measure(
    k: int,
    latency: float,
    args: argparse.Namespace,
    adaptive: bool,
    concurrency: int | None = None,
) -> dict[str, Any]:
    proc, url = start_server(k, latency)
    try:
        out = asyncio.run(run(url, args, adaptive, concurrency or args.max_concurrency))
        st = stats(url)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    ideal = k / latency
    out.update(
        k=k,
        ideal=ideal,
        steady=out["steady_rate"] / ideal,
        overall=out["overall_rate"] / ideal,
        share_429=st["rejected"] / max(1, st["requests"]),
        requests=st["requests"],
        rejected=st["rejected"],
        peak=st["peak_in_flight"],
    )
    w = out["at_warmup"]
    out["steady_429"] = (st["rejected"] - w["rejected"]) / max(1, st["requests"] - w["requests"])
    return out


def show(label: str, r: dict[str, Any]) -> None:
    print(
        f"{label} K={r['k']:>3}: steady {r['steady_rate']:7.1f}/s = {r['steady']:.2f} of "
        f"K/latency ({r['ideal']:.0f}/s), whole run {r['overall']:.2f}; "
        f"{r['rejected']}/{r['requests']} answered 429 ({100 * r['share_429']:.1f}%, "
        f"{100 * r['steady_429']:.1f}% after warm-up); "
        f"{r['ok']} ok, {r['failed']} failed; window at the end {r['window']}; "
        f"server peak {r['peak']}",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", default="4,16,64")
    p.add_argument("--latency", type=float, default=0.2)
    p.add_argument(
        "--latencies",
        default=None,
        help="per K, comma separated (default: --latency for every K); a small machine "
        "may need a longer one for K=64, see what the oracle reaches",
    )
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--max-concurrency", type=int, default=128)
    p.add_argument("--baseline", action="store_true", help="also run with the window off")
    args = p.parse_args()
    ks = [int(x) for x in args.ks.split(",")]
    if args.latencies:
        latencies = [float(x) for x in args.latencies.split(",")]
        if len(latencies) != len(ks):
            p.error("--latencies needs one value per K")
    else:
        latencies = [args.latency] * len(ks)
    shown = ", ".join(f"K={k} {lat}s" for k, lat in zip(ks, latencies, strict=True))
    print(
        f"latency {shown}; {args.duration:.0f}s per K (steady state after "
        f"{args.warmup:.0f}s), max_concurrency {args.max_concurrency}, "
        f"load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results = []
    for k, latency in zip(ks, latencies, strict=True):
        # The oracle: a client told K (window off, max_concurrency K) on this machine.
        oracle = measure(k, latency, args, adaptive=False, concurrency=k)
        show("oracle  ", oracle)
        r = measure(k, latency, args, adaptive=True)
        r["vs_oracle"] = r["steady_rate"] / max(1e-9, oracle["steady_rate"])
        show("aimd    ", r)
        print(f"          K={k:>3}: aimd / oracle (steady) = {r['vs_oracle']:.2f}", flush=True)
        results.append(r)
        if args.baseline:
            show("fixed   ", measure(k, latency, args, adaptive=False))
    summary = ", ".join(
        f"K={r['k']} {r['steady']:.2f}/ {100 * r['share_429']:.1f}%" for r in results
    )
    oracle_line = ", ".join(f"K={r['k']} {r['vs_oracle']:.2f}" for r in results)
    print(f"aimd vs oracle (a client told K, same run): {oracle_line}")
    print(f"aimd: {summary} (target >= 0.9, <= 2%)")


if __name__ == "__main__":
    main()
