"""Run the deployed services as real subprocesses against the local RabbitMQ, PostgreSQL
and Redis, moto for S3, and the scripted LLM server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_database() -> tuple[str, str]:
    """A fresh PostgreSQL database; returns (name, async URL)."""
    name = "airoboros_t_" + uuid.uuid4().hex[:10]
    subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-c", f"CREATE DATABASE {name}"],
        check=True,
        capture_output=True,
    )
    return name, f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"


def drop_database(name: str) -> None:
    subprocess.run(
        [
            "psql",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-c",
            f"DROP DATABASE IF EXISTS {name} WITH (FORCE)",
        ],
        capture_output=True,
    )


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log: Path


@dataclass
class Stack:
    """The services of one test: their shared environment, processes and logs."""

    tmp: Path
    env: dict[str, str]
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def topics_url(self) -> str:
        return f"http://127.0.0.1:{self.procs['topics'].port}"

    def start(self, name: str, module: str, **extra: str) -> Proc:
        port = free_port()
        env = {**self.env, "AIROBOROS_PORT": str(port), **extra}
        log = self.tmp / f"{name}.log"
        popen = subprocess.Popen(
            [sys.executable, "-m", module],
            env=env,
            cwd=REPO,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        proc = Proc(name, popen, port, log)
        self.procs[name] = proc
        self.wait_ready(proc)
        return proc

    def wait_ready(self, proc: Proc, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited:\n{proc.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{proc.port}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{proc.name} not ready:\n{proc.log.read_text()[-3000:]}")

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait(timeout=30)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
        self.procs.clear()

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.topics_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
        )

    def wait_job(self, job_id: str, timeout: float = 240) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline:
                body: dict[str, Any] = c.get(f"/v1/jobs/{job_id}").json()
                if body["status"] != "running":
                    return body
                time.sleep(0.5)
        logs = "\n".join(f"--- {p.name}\n{p.log.read_text()[-2000:]}" for p in self.procs.values())
        raise AssertionError(f"job {job_id} still running after {timeout}s\n{logs}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log.read_text()[-4000:]}" for p in self.procs.values())


def base_env(database_url: str, s3_endpoint: str, llm_base_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AIROBOROS_"))}
    prefix = "t" + uuid.uuid4().hex[:10]
    env.update(
        {
            "AIROBOROS_DATABASE_URL": database_url,
            "AIROBOROS_AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/",
            "AIROBOROS_AMQP_PREFIX": prefix,
            "AIROBOROS_REDIS_URL": "redis://127.0.0.1:6379/0",
            "AIROBOROS_REDIS_PREFIX": prefix,
            "AIROBOROS_S3_ENDPOINT": s3_endpoint,
            "AIROBOROS_S3_ACCESS_KEY": "testing",
            "AIROBOROS_S3_SECRET_KEY": "testing",
            "AIROBOROS_S3_BUCKET": "airoboros-test",
            "AIROBOROS_S3_SECURE": "false",
            "AIROBOROS_API_KEYS": f"{API_KEY},another-key",
            "AIROBOROS_HOST": "127.0.0.1",
            "AIROBOROS_DEDUPE_PARTITIONS": "2",
            "AIROBOROS_MAX_DELIVERIES": "3",
            "OPENAI_API_KEY": "sk-test",
            "OPENAI_BASE_URL": llm_base_url,
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
        }
    )
    return env


def delete_amqp(prefix: str, partitions: int = 2) -> None:
    """Delete the queues and exchanges a test's services declared (quorum queues are
    heavy for the broker; a test must not leave them behind)."""
    import asyncio

    import aio_pika

    from airoboros.bus_amqp import AmqpBus
    from airoboros.contracts import CandidatesProposed
    from airoboros.topics.service import PIPELINE_QUEUES

    bus = AmqpBus(
        "amqp://guest:guest@127.0.0.1:5672/",
        prefix=prefix,
        partitions={CandidatesProposed.topic: partitions},
    )
    names = [q for t, g in PIPELINE_QUEUES for q in bus.queue_names(t, g)]
    names += [f"{n}.dlq" for n in list(names)]

    async def go() -> None:
        conn = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/", timeout=10)
        try:
            channel = await conn.channel()
            for name in names:
                await channel.queue_delete(name)
            for exchange in (prefix, f"{prefix}.dlx"):
                await channel.exchange_delete(exchange)
        finally:
            await conn.close()

    asyncio.run(go())
