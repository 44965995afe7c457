"""The web console in headless Chromium (Debian's /usr/bin/chromium driven by Playwright's
Python package; no browser is downloaded) against the real services: topics, generator
and dedupe on RabbitMQ, PostgreSQL, Redis and S3 (moto) with the scripted LLM server,
and ``python -m airoboros.lmoe.api`` with a tiny random model as the router the
playground talks to. One stack per module: starting it is most of the suite's time."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.helpers import LMOE_SAMPLES
from tests.fakes.llm_server import Script, ScriptedLLM, ServerThread
from tests.integration.services_harness import (
    API_KEY,
    REPO,
    Proc,
    Stack,
    base_env,
    create_database,
    delete_amqp,
    drop_database,
    free_port,
)

CHROMIUM = "/usr/bin/chromium"
#: headless, no sandbox (root in CI), and nothing that reaches beyond loopback on its own
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
ARTIFACTS = REPO / "build" / "test-artifacts" / "console"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

SAMPLES = LMOE_SAMPLES


@dataclass
class Services:
    """The running stack of the module."""

    stack: Stack
    llm: ScriptedLLM
    database_url: str
    lmoe_url: str
    jobs: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.stack.topics_url

    @property
    def console(self) -> str:
        return f"{self.stack.topics_url}/console/"

    def client(self) -> httpx.Client:
        return self.stack.client()

    def post_job(self, job: dict[str, Any]) -> str:
        with self.client() as c:
            r = c.post("/v1/jobs", json=job)
            assert r.status_code == 201, r.text
            return str(r.json()["id"])


def launch(stack: Stack, name: str, args: list[str], env: dict[str, str], port: int) -> Proc:
    """Start a process without waiting for it (the stack's processes boot side by side)."""
    log = stack.tmp / f"{name}.log"
    popen = subprocess.Popen(
        [sys.executable, *args], env=env, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    proc = Proc(name, popen, port, log)
    stack.procs[name] = proc
    return proc


def build_lmoe(root: Path) -> tuple[Path, Path]:
    """A tiny random Llama and an LMoE package of two experts (code, cooking)."""
    from tests.fakes.tiny_llama import build_tiny_llama, make_lora_adapter

    base = build_tiny_llama(root / "tiny-llama", initializer_range=0.1)
    pkg = root / "package"
    model: Any = base
    for seed, (expert, samples) in enumerate(SAMPLES.items(), 1):
        model = make_lora_adapter(
            model, pkg / "adapters" / expert, seed, description=f"the {expert} expert"
        )
        routing = pkg / "routing_data" / f"expert_{expert}.jsonl"
        routing.parent.mkdir(parents=True, exist_ok=True)
        routing.write_text(
            "".join(json.dumps({"instruction": f"A chat. {s}"}) + "\n" for s in samples)
        )
    return base, pkg


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    from moto.server import ThreadedMotoServer

    tmp = tmp_path_factory.mktemp("console")
    s3_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    moto.start()
    llm = ServerThread(ScriptedLLM(Script(latency=0.02, duplicate_rate=0.1)))
    llm.__enter__()
    name, database_url = create_database()
    env = base_env(database_url, f"127.0.0.1:{s3_port}", llm.base_url)
    stack = Stack(tmp, env)
    try:
        subprocess.run(
            [sys.executable, "-c", "from airoboros.cli import entry; entry()", "migrate"],
            env=env,
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        # The workers boot (torch, the embedder) while the tiny model is built here.
        for svc, module in (("dedupe", "airoboros.dedupe"), ("generator", "airoboros.generator")):
            port = free_port()
            launch(stack, svc, ["-m", module], {**env, "AIROBOROS_PORT": str(port)}, port)
        base, pkg = build_lmoe(tmp / "lmoe")
        lmoe_port = free_port()
        lmoe_env = {k: v for k, v in env.items() if not k.startswith("AIROBOROS_")}
        launch(
            stack,
            "lmoe",
            ["-m", "airoboros.lmoe.api", "--base-model", str(base), "--lmoe", str(pkg),
             "--router-k", "3", "--router-max-samples", "100", "--port", str(lmoe_port),
             "--api-keys", API_KEY],
            lmoe_env,
            lmoe_port,
        )  # fmt: skip
        lmoe_url = f"http://127.0.0.1:{lmoe_port}"
        topics_port = free_port()
        launch(
            stack,
            "topics",
            ["-m", "airoboros.topics"],
            {**env, "AIROBOROS_PORT": str(topics_port), "AIROBOROS_ROUTER_URL": lmoe_url},
            topics_port,
        )
        for proc in list(stack.procs.values()):
            stack.wait_ready(proc, timeout=180)
        yield Services(stack, llm.llm, database_url, lmoe_url)
    finally:
        stack.stop_all()
        llm.__exit__(None, None, None)
        moto.stop()
        drop_database(name)
        in_thread(lambda: delete_amqp(env["AIROBOROS_AMQP_PREFIX"]))


def seed_job(database_url: str, job_id: str, rows: list[Any], targets: dict[str, int]) -> None:
    """A finished job with the given rows (airoboros.contracts.Item), owned by the test key,
    written straight to the store (rows whose shape a test needs exactly)."""
    from airoboros.store import SqlStore
    from airoboros.web import key_owner

    async def go() -> None:
        store = SqlStore(database_url)
        await store.connect(migrate=False)
        try:
            await store.jobs.ensure(job_id, config={}, targets=targets, owner=key_owner(API_KEY))
            await store.rows.add(
                job_id, [(f"{job_id}-{i}", r) for i, r in enumerate(rows)], cap=False
            )
            await store.jobs.set_status(job_id, "done")
        finally:
            await store.close()

    in_thread(lambda: asyncio.run(go()))


def in_thread(fn: Any) -> Any:
    """Run ``fn`` in a thread of its own: Playwright's sync API keeps an event loop running
    in the test's thread, where asyncio.run is refused."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


@pytest.fixture(scope="module")
def browser(services: Services) -> Iterator[Any]:
    # (after ``services``, so the browser is closed before the stack is torn down)
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for stale in ARTIFACTS.glob("FAILED-*.png"):
        stale.unlink()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@dataclass
class Watch:
    """What a page did: every request's URL and headers, console messages, page errors."""

    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[FAILED] = report.failed
    return report


FAILED = pytest.StashKey[bool]()


@pytest.fixture
def page(browser: Any, services: Services, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser context (empty storage) at 1280x800. At the end: no request left the
    topics origin, the key was never in a URL, no script error, no CSP violation."""
    context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    context.set_default_timeout(30000)  # a loaded 2-core CI machine: waits, not checks
    pg = context.new_page()
    watch = Watch()
    pg.on("request", lambda r: watch.requests.append((r.url, r.headers)))
    pg.on("console", lambda m: watch.console.append(f"{m.type}: {m.text}"))
    pg.on("pageerror", lambda e: watch.errors.append(str(e)))
    pg.watch = watch
    yield pg
    if request.node.stash.get(FAILED, False):  # what the page showed when it failed
        pg.screenshot(path=str(ARTIFACTS / f"FAILED-{request.node.name}.png"), full_page=True)
    context.close()
    origin = services.url
    for url, headers in watch.requests:
        assert url.startswith((origin + "/", "blob:", "data:")), (
            f"request outside the origin: {url}"
        )
        assert API_KEY not in url, f"the key in a URL: {url}"
        if url.startswith(origin + "/v1/"):
            assert headers.get("authorization", "").startswith("Bearer "), url
    assert not watch.errors, watch.errors
    violations = [m for m in watch.console if "Content Security Policy" in m]
    assert not violations, violations


def sign_in(page: Any, services: Services, hash_: str = "#/jobs", remember: bool = False) -> None:
    page.goto(services.console + hash_)
    page.get_by_label("API key").fill(API_KEY)
    if remember:
        page.get_by_label("Remember on this device").check()
    page.get_by_role("button", name="Continue").click()
    page.locator("form.key-form").wait_for(state="detached")
    page.locator("main h1").first.wait_for()


def shot(page: Any, name: str, full_page: bool = True) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path
