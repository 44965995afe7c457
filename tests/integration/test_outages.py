"""Outages of a dependency (the database, Redis, the broker) must never make a worker ack
and drop a message, nor spend its delivery limit: the bus waits the outage out with the
message kept (airoboros.bus.handle_through_outages), and /readyz says 503 meanwhile.

The first tests need nothing stopped (the AMQP ones need the local RabbitMQ). The
``db_restart`` ones run the services as subprocesses (as tests/integration/test_services.py
does) and stop the local PostgreSQL, or Redis, for about 20 s mid-job (as root); deselect
them with ``-m "not db_restart"``.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import httpx
import pytest

from airoboros.bus import InMemoryBus
from airoboros.contracts import Message
from airoboros.errors import StoreUnavailable, is_unavailable
from airoboros.health import HealthServer
from airoboros.settings import ServiceSettings
from airoboros.store import SqlStore
from airoboros.worker import JobStatusCache, dependencies_ready, serve
from tests.integration.services_harness import Stack, free_port
from tests.integration.test_bus_amqp import Buses, _broker_up, wait_until
from tests.integration.test_bus_amqp import buses as buses
from tests.integration.test_services import post_job, start_all
from tests.integration.test_services import s3 as s3
from tests.integration.test_services import stack as stack

FAST = (0.01, 0.05)  # in-place backoff for the tests: quick, still doubling
needs_broker = pytest.mark.skipif(not _broker_up(), reason="no RabbitMQ on 127.0.0.1:5672")


class Ping(Message):
    topic: ClassVar[str] = "test.outage"
    kind: Literal["outage_ping"] = "outage_ping"
    n: int


def closed_port_url() -> str:
    """A PostgreSQL URL on a loopback port nothing listens on: connection refused."""
    return f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nothing"


def flaky(failures: int, effects: list[str], attempts: list[str]) -> Callable[[Ping], Any]:
    """A handler whose database is down for its first ``failures`` attempts."""

    async def handle(m: Ping) -> None:
        attempts.append(m.message_id)
        if len(attempts) <= failures:
            raise StoreUnavailable("database is down") from ConnectionRefusedError(111, "refused")
        effects.append(m.message_id)

    return handle


# --- AmqpBus: what needs the broker's own delivery counts --------------------------------
# (Outages waited out in place, past the patience, and in the dead-letter consumer are
# held against both buses in tests/contract/test_bus_contract.py.)


@needs_broker
async def test_amqp_bus_retries_an_outage_in_place_without_a_redelivery(buses: Buses) -> None:
    from airoboros.bus_amqp import _delivery_count

    bus = buses(max_deliveries=2)
    bus.outage_backoff = FAST
    effects: list[str] = []
    attempts: list[str] = []
    bus.subscribe(Ping, flaky(2, effects, attempts), group="g")
    # Each delivery the broker makes, with its x-delivery-count (0 on the first).
    deliveries: list[tuple[int, bool]] = []
    handle = bus._handle

    async def recording(sub: Any, queue: str, incoming: Any) -> None:
        deliveries.append((_delivery_count(incoming), bool(incoming.redelivered)))
        await handle(sub, queue, incoming)

    bus._handle = recording  # type: ignore[method-assign]
    await bus.start()
    (queue,) = bus.queue_names(Ping, "g")
    sent = Ping(n=1)
    await bus.publish(sent)
    await wait_until(lambda: bool(effects), 15, "the handler's effect")
    await asyncio.sleep(0.5)  # a redelivery, if any, would show up now
    assert effects == [sent.message_id]
    assert attempts == [sent.message_id] * 3
    assert deliveries == [(0, False)], "one delivery: the broker counted nothing"
    assert await bus.message_count(queue) == 0
    assert await bus.message_count(f"{queue}.dlq") == 0


@needs_broker
async def test_amqp_dead_letter_consumer_waits_out_an_outage_in_place(buses: Buses) -> None:
    bus = buses(max_deliveries=1, dead_letter_retry_delay=0.05)
    bus.outage_backoff = FAST

    async def poison(m: Ping) -> None:
        raise RuntimeError("not an outage: dead-lettered at once")

    bus.subscribe(Ping, poison, group="g")
    await bus.start()
    (queue,) = bus.queue_names(Ping, "g")
    entries: list[bool] = []
    handle = bus._on_dead_letter

    async def recording(handler: Any, name: str, incoming: Any) -> None:
        entries.append(bool(incoming.redelivered))
        await handle(handler, name, incoming)

    bus._on_dead_letter = recording  # type: ignore[method-assign]
    recorded: list[str] = []
    calls = 0

    async def record(name: str, body: bytes, headers: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        if calls <= 2:  # the store that records dead letters is down for a moment
            raise StoreUnavailable("database is down")
        recorded.append(name)

    await bus.consume_dead_letters(record)
    await bus.publish(Ping(n=1))
    await wait_until(lambda: bool(recorded), 15, "the dead letter recorded")
    await asyncio.sleep(0.3)
    assert recorded == [f"{queue}.dlq"] and calls == 3
    assert entries == [False], "kept in place, not requeued through the dead-letter queue"
    assert await bus.message_count(f"{queue}.dlq") == 0


# --- the job-status check and readiness ----------------------------------------------


async def test_job_status_cache_raises_when_the_database_is_down(tmp_path: Path) -> None:
    down = SqlStore(closed_port_url())
    await down.connect(migrate=False)
    try:
        cache = JobStatusCache.from_jobs(down.jobs)
        for _ in range(2):  # and an outage is not cached as an answer
            with pytest.raises(StoreUnavailable) as info:
                await cache.running("job-1")
            assert is_unavailable(info.value.__cause__ or info.value)
            assert info.value.__cause__ is not None
    finally:
        await down.close()
    # A real answer is still an answer: a job that does not exist is not running.
    up = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}")
    await up.connect()
    try:
        assert await JobStatusCache.from_jobs(up.jobs).running("no-such-job") is False
    finally:
        await up.close()


async def _get(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        return await c.get(path)


async def test_health_server_readyz_asks_an_async_check() -> None:
    state = {"ready": True, "delay": 0.0}

    async def check() -> bool:
        await asyncio.sleep(state["delay"])
        return bool(state["ready"])

    server = HealthServer("127.0.0.1", 0, check)
    server.check_timeout = 0.3
    await server.start()
    try:
        r = await _get(server.port, "/readyz")
        assert (r.status_code, r.json()) == (200, {"status": "ready"})
        state["ready"] = False
        assert (await _get(server.port, "/readyz")).status_code == 503
        state["ready"], state["delay"] = True, 5.0  # a check that hangs: not ready, quickly
        t0 = time.monotonic()
        assert (await _get(server.port, "/readyz")).status_code == 503
        assert time.monotonic() - t0 < 2
        assert (await _get(server.port, "/healthz")).status_code == 200  # alive all along
    finally:
        await server.close()

    async def broken() -> bool:
        raise ConnectionRefusedError(111, "refused")

    for probe, want in ((lambda: True, 200), (lambda: False, 503), (broken, 503)):
        server = HealthServer("127.0.0.1", 0, probe)  # sync callables still work
        await server.start()
        try:
            assert (await _get(server.port, "/readyz")).status_code == want
        finally:
            await server.close()


async def test_dependencies_ready_asks_the_broker_the_store_and_the_checks(
    tmp_path: Path,
) -> None:
    bus = InMemoryBus()
    up = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}")
    down = SqlStore(closed_port_url())
    await up.connect()
    await down.connect(migrate=False)

    async def yes() -> bool:
        return True

    async def no() -> bool:
        return False

    try:
        assert await dependencies_ready(up, bus) is False, "the bus has not started"
        await bus.start()
        assert await dependencies_ready(up, bus) is True
        assert await dependencies_ready(None, bus, yes) is True
        assert await dependencies_ready(down, bus) is False
        assert await dependencies_ready(up, bus, yes, no) is False
        await bus.close()
        assert await dependencies_ready(up, bus) is False
    finally:
        await up.close()
        await down.close()


async def test_serve_readyz_fails_while_the_workers_database_is_down() -> None:
    down = SqlStore(closed_port_url())
    await down.connect(migrate=False)
    port = free_port()
    settings = ServiceSettings(host="127.0.0.1", port=port)
    stop = asyncio.Event()
    bus = InMemoryBus()
    task = asyncio.create_task(serve(settings, bus, stop, "test worker", store=down))
    try:
        await wait_until(lambda: bus.connected, 10, "the bus started")
        r = await _get(port, "/readyz")
        assert r.status_code == 503, r.text
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await down.close()


# --- the generator's shared limits (Redis) ------------------------------------------


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
async def test_shared_limits_wait_for_redis_to_come_back(tmp_path: Path) -> None:
    """A Redis of this test's own, started 1.5 s late: the limiter and the budget wait
    for it rather than fail the call (the shared Redis is left alone)."""
    from redis.asyncio import Redis

    from airoboros.llm.shared_limits import RedisTokenBucket, RedisUsageMeter

    port = free_port()
    redis = Redis.from_url(f"redis://127.0.0.1:{port}/0")
    bucket = RedisTokenBucket(redis, "t:bucket", rate=100.0, capacity=100.0)
    meter = RedisUsageMeter(redis, "t:usage", max_tokens=10_000)

    async def start_redis_late() -> asyncio.subprocess.Process:
        await asyncio.sleep(1.5)
        return await asyncio.create_subprocess_exec(
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(tmp_path),
            stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip

    late = asyncio.create_task(start_redis_late())
    t0 = time.monotonic()
    server: asyncio.subprocess.Process | None = None
    try:
        await asyncio.wait_for(bucket.take(10), 30)  # raised ConnectionError at once before
        assert time.monotonic() - t0 >= 1.0, "Redis was not down: nothing was waited out"
        server = await late
        await meter.seed(0, 0.0)
        await meter.arecord("general", "gpt-4", 10, 20)
        assert (await meter.shared_total()).prompt_tokens == 30
    finally:
        server = server or await late
        await redis.aclose()
        server.terminate()
        await asyncio.wait_for(server.wait(), 10)


# --- end to end: PostgreSQL and Redis stopped mid-job -----------------------------------

OUTAGE_JOB = {
    "model": "gpt-4",
    "topics": [f"topic {i}" for i in range(40)],
    "default_batch_size": 4,
    "max_concurrency": 8,
    "request_timeout": 10,
    "instructors": {"general": {"count": 40}, "joke": {"count": 30}, "trivia": {"count": 30}},
}
OUTAGE_SECONDS = 20.0
#: a new row must be stored within this many seconds of the dependency's return
RESUME_WITHIN = 15.0


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _wait(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(0.1)


def _pg_version() -> str | None:
    if shutil.which("pg_ctlcluster") is None or not os.path.isdir("/etc/postgresql"):
        return None
    versions = sorted(os.listdir("/etc/postgresql"))
    return versions[-1] if versions else None


def _pg_ctl(action: str) -> None:
    version = _pg_version()
    assert version is not None
    extra = ["-m", "fast"] if action == "stop" else []
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action, *extra],
        check=True,
        capture_output=True,
        timeout=120,
    )


def _psql(sql: str, database: str = "postgres") -> str:
    out = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", database, "-tAc", sql],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return out.stdout.strip()


def _pg_answers() -> bool:
    try:
        return _psql("SELECT 1") == "1"
    except (RuntimeError, subprocess.TimeoutExpired):
        return False


def _pg_stop() -> None:
    _pg_ctl("stop")
    _wait(lambda: not _port_open(5432), 30, "PostgreSQL to stop")


def _pg_start() -> None:
    _pg_ctl("start")
    _wait(lambda: _port_open(5432) and _pg_answers(), 120, "PostgreSQL to accept connections")


def _redis_answers() -> bool:
    out = subprocess.run(["redis-cli", "-p", "6379", "ping"], capture_output=True, text=True)
    return out.stdout.strip() == "PONG"


def _redis_stop() -> None:
    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], capture_output=True)
    _wait(lambda: not _port_open(6379), 30, "Redis to stop")


def _redis_start() -> None:
    os.makedirs("/var/lib/redis", exist_ok=True)
    os.makedirs("/var/log/redis", exist_ok=True)
    command = "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save '' "
    command += "--appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log"
    subprocess.run(shlex.split(command), check=True, capture_output=True, timeout=30)
    _wait(_redis_answers, 60, "Redis to answer")


class Prober(threading.Thread):
    """Asks some /readyz every 0.25 s, recording (monotonic time, name, status; 0 when
    the probe got no answer)."""

    def __init__(self, urls: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.urls = urls
        self.samples: list[tuple[float, str, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for name, url in self.urls.items():
                try:
                    code = httpx.get(url, timeout=5).status_code
                except httpx.HTTPError:
                    code = 0
                self.samples.append((time.monotonic(), name, code))
            time.sleep(0.25)

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=10)

    def codes(self, name: str, start: float, end: float) -> list[int]:
        return [c for t, n, c in self.samples if n == name and start <= t <= end]


def _stored(database: str, job_id: str) -> int:
    return int(_psql(f"SELECT count(*) FROM items WHERE job_id = '{job_id}'", database))


def _job_status(stack: Stack, job_id: str, within: float = 300) -> dict[str, Any]:
    """The job's status once it is no longer running (tolerating 503s on the way)."""
    deadline = time.monotonic() + within
    with stack.client() as c:
        while time.monotonic() < deadline:
            try:
                r = c.get(f"/v1/jobs/{job_id}")
            except httpx.HTTPError:
                r = None
            if r is not None and r.status_code == 200 and r.json()["status"] != "running":
                return dict(r.json())
            time.sleep(0.5)
    raise AssertionError(f"job {job_id} still running after {within}s\n{stack.logs()}")


def _run_with_outage(
    stack: Stack, stop: Callable[[], None], start: Callable[[], None], *, measure_db: bool
) -> None:
    database = stack.env["AIROBOROS_DATABASE_URL"].rsplit("/", 1)[1]
    stack.llm.script.latency = 0.05  # type: ignore[attr-defined]
    start_all(stack)  # topics, dedupe and two generators
    job_id = post_job(stack, OUTAGE_JOB)
    total = sum(c["count"] for c in OUTAGE_JOB["instructors"].values())  # type: ignore[attr-defined]
    _wait(lambda: _stored(database, job_id) >= 3, 120, "the first rows")
    gen = stack.procs["generator0"].port
    ded = stack.procs["dedupe"].port
    prober = Prober(
        {
            "generator0": f"http://127.0.0.1:{gen}/readyz",
            "dedupe": f"http://127.0.0.1:{ded}/readyz",
        }
    )
    prober.start()
    try:
        _wait(lambda: len(prober.samples) >= 4, 20, "the first probes")
        before = _stored(database, job_id)
        assert before < total, "the job ended before the outage: make it larger"
        t_down = time.monotonic()
        try:
            stop()
            time.sleep(OUTAGE_SECONDS)
        finally:
            start()  # whatever happened, bring it back and wait for it
        t_up = time.monotonic()
        # Progress resumes within seconds: a row stored after the dependency came back.
        at_recovery = _stored(database, job_id)
        _wait(
            lambda: _stored(database, job_id) > at_recovery,
            max(0.0, t_up + RESUME_WITHIN - time.monotonic()),
            f"a new row within {RESUME_WITHIN}s of the recovery\n{stack.logs()}",
        )
        status = _job_status(stack, job_id)
        time.sleep(3.0)  # dead letters are recorded by topics as they arrive
        with stack.client() as c:
            final = c.get(f"/v1/jobs/{job_id}").json()
        export = c_rows(stack, job_id)
    finally:
        prober.stop()
    logs = stack.logs()
    assert status["status"] == "done", logs
    assert final["dead_letters"] == [], final["dead_letters"]
    want = {k: v["count"] for k, v in OUTAGE_JOB["instructors"].items()}  # type: ignore[attr-defined]
    assert {k: v["accepted"] for k, v in status["instructors"].items()} == want
    assert Counter(r["category"] for r in export) == want
    keys = [(r["instruction"], r.get("system"), r["response"]) for r in export]
    assert len(set(keys)) == len(keys), "a row was written twice"
    # No batch failed for the outage (a failed batch is work thrown away and redone).
    assert sum(v["failures"] for v in status["instructors"].values()) == 0, (status, logs)
    # /readyz said so: 200 before, 503 while it was down, 200 again after, for the
    # workers that use what went down. The generator has no database (its tasks carry
    # their settings), so a database outage leaves it ready; Redis it does use.
    assert 200 in prober.codes("generator0", 0, t_down)
    during = prober.codes("generator0", t_down + 1.0, t_up)
    if measure_db:
        assert 503 not in during, during
        assert 503 in prober.codes("dedupe", t_down + 1.0, t_up)
    else:
        assert 503 in during, during
    assert prober.codes("generator0", t_up, time.monotonic())[-1:] == [200]


def c_rows(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    import json

    with stack.client() as c:
        r = c.get(f"/v1/jobs/{job_id}/export", params={"format": "jsonl"})
        assert r.status_code == 200, r.text
        return [json.loads(line) for line in r.text.splitlines() if line]


def _root() -> bool:
    return os.geteuid() == 0


@pytest.fixture
def postgres_restorer() -> Iterator[None]:
    """Whatever a test does, PostgreSQL is running again after it."""
    yield
    if not _port_open(5432):
        _pg_start()


@pytest.fixture
def redis_restorer() -> Iterator[None]:
    yield
    if not _redis_answers():
        _redis_start()


@pytest.mark.services
@pytest.mark.db_restart
@pytest.mark.skipif(_pg_version() is None, reason="needs pg_ctlcluster (a local PostgreSQL)")
@pytest.mark.skipif(not _root(), reason="stopping PostgreSQL needs root")
def test_postgres_stopped_mid_job_loses_nothing(stack: Stack, postgres_restorer: None) -> None:
    _run_with_outage(stack, _pg_stop, _pg_start, measure_db=True)


@pytest.mark.services
@pytest.mark.db_restart
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs a local redis-server")
@pytest.mark.skipif(not _root(), reason="restarting Redis needs root")
def test_redis_stopped_mid_job_loses_nothing(stack: Stack, redis_restorer: None) -> None:
    _run_with_outage(stack, _redis_stop, _redis_start, measure_db=False)
