"""The topics API's routes for the web console, over real HTTP (the app under uvicorn on a
loopback port) and a real PostgreSQL database (127.0.0.1:5432, fresh per test, migrated
by the store): rows searched and marked bad (left out of every export and of the status's
count, restored when unmarked), the experts of the adapter registry with the router's pods
(a real router app in front of a fake OpenAI-compatible pod), and the playground's
pass-through to that router, streamed."""

from __future__ import annotations

import io
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from airoboros.bus import InMemoryBus
from airoboros.contracts import Item
from airoboros.exports import FORMATS
from airoboros.objects import LocalObjectStore
from airoboros.settings import TopicsSettings
from airoboros.store import SqlStore
from airoboros.topics.app import create_app
from airoboros.topics.service import TopicsService
from airoboros.web import key_owner
from tests.fakes.asgi_server import AppServer
from tests.fakes.openai_backend import BackendThread, FakeBackend
from tests.integration.services_harness import create_database, drop_database, free_port
from tests.integration.test_router import EXPERTS, serve_router, write_package

pytestmark = pytest.mark.postgres

KEY = "console-key-1"
OTHER = "console-key-2"
ADMIN = "console-admin-key"
JOB = "job-console-1"
OTHER_JOB = "job-console-2"
ROWS = [
    Item(instruction="What is photosynthesis?", response="Plants make sugar.", category="general"),
    Item(instruction="Who wrote Hamlet?", response="Shakespeare.", category="trivia"),
    Item(
        instruction="Greet me.",
        response="Hello!",
        category="general",
        system="You are a cheerful BOTANIST.",
    ),
    Item(instruction="What is 50% of 8?", response="4", category="reasoning_or_math"),
    Item(instruction="Name a snake_case word.", response="user_name", category="general"),
    Item(
        instruction="A chat between Zora and Emily.\nEmily: Hi?\nZora: Hello.\nEmily: Fly?",
        response="Zora: Always.",
        category="gtkm",
        skip_prompt_formatting=True,
    ),
]


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


class ClosingApp:
    """The topics app, closing its store in the server's own event loop at shutdown (the
    driver's connections belong to the loop that opened them)."""

    def __init__(self, app: Any, store: SqlStore) -> None:
        self.app = app
        self.store = store

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def send_closing(message: Any) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await self.store.close()
            await send(message)

        return await self.app(scope, receive, send_closing)


class Env:
    def __init__(self, url: str, seed: SqlStore, objects: Path, database: str) -> None:
        self.url = url
        self.seed = seed
        self.objects = objects
        self.database = database

    def client(self, key: str = KEY) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=auth(key), timeout=60)


@pytest.fixture
def database() -> Iterator[str]:
    name, url = create_database()
    try:
        yield url
    finally:
        drop_database(name)


@pytest.fixture
def topics(database: str, tmp_path: Path) -> Iterator[Any]:
    """Factory: ``await topics(router_url=..., router_api_key=...)`` serves the topics app
    (seeded: JOB owned by KEY with ROWS, OTHER_JOB owned by OTHER) on a loopback port."""
    with ExitStack() as stack:

        async def start(**settings: Any) -> Env:
            cfg = TopicsSettings(api_keys=f"{KEY},{OTHER}", admin_api_keys=ADMIN, **settings)
            seed = SqlStore(database)
            await seed.connect()  # runs the migrations (0012 included) on PostgreSQL
            if not await seed.jobs.exists(JOB):
                await seed.jobs.ensure(
                    JOB, config={}, targets={r.category: 10 for r in ROWS}, owner=key_owner(KEY)
                )
                await seed.rows.add(JOB, [(f"s-{i}", r) for i, r in enumerate(ROWS)], cap=False)
                await seed.jobs.set_status(JOB, "done")
                await seed.jobs.ensure(
                    OTHER_JOB, config={}, targets={"general": 1}, owner=key_owner(OTHER)
                )
                await seed.rows.add(OTHER_JOB, [("s-0", ROWS[0])], cap=False)
            # The app's own store: its connections are opened in the server's loop.
            store = SqlStore(database)
            await store.connect(migrate=False)
            objects = tmp_path / "objects"
            svc = TopicsService(cfg, store, InMemoryBus(), LocalObjectStore(objects))
            server = stack.enter_context(AppServer(ClosingApp(create_app(cfg, service=svc), store)))
            return Env(server.url, seed, objects, database)

        yield start


@pytest.fixture
async def env(topics: Any) -> AsyncIterator[Env]:
    e: Env = await topics()
    yield e
    await e.seed.close()


async def listed(c: httpx.AsyncClient, job: str = JOB, **params: Any) -> list[dict[str, Any]]:
    r = await c.get(f"/v1/jobs/{job}/items", params=params)
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


# --- rows: search -----------------------------------------------------------------------------


async def test_search_finds_rows_by_instruction_response_and_system(env: Env) -> None:
    async with env.client() as c:
        assert [r["instruction"] for r in await listed(c, q="PHOTOSYNTHESIS")] == [
            "What is photosynthesis?"
        ]
        assert [r["instruction"] for r in await listed(c, q="shakespeare")] == ["Who wrote Hamlet?"]
        [greet] = await listed(c, q="botanist")
        assert greet["system"] == "You are a cheerful BOTANIST." and greet["bad"] is False
        # A multi-turn row is searched (and listed) with its fields as they are.
        [chat] = await listed(c, q="emily: fly")
        assert chat["category"] == "gtkm" and chat["skip_prompt_formatting"] is True
        # Combined with category and paging.
        assert await listed(c, q="photosynthesis", category="trivia") == []
        page = await listed(c, q="e", limit=2)
        assert len(page) == 2
        rest = await listed(c, q="e", after=page[-1]["seq"])
        assert {r["seq"] for r in rest}.isdisjoint(r["seq"] for r in page)


async def test_search_takes_like_wildcards_literally(env: Env) -> None:
    async with env.client() as c:
        assert [r["instruction"] for r in await listed(c, q="50%")] == ["What is 50% of 8?"]
        assert [r["instruction"] for r in await listed(c, q="%")] == ["What is 50% of 8?"]
        assert [r["response"] for r in await listed(c, q="r_n")] == ["user_name"]
        assert len(await listed(c, q="_")) == 1  # as a wildcard it would match every row
        assert await listed(c, q="50_") == []
        assert await listed(c, q="\\") == []


async def test_search_bounds(env: Env) -> None:
    async with env.client() as c:
        for q in ("", "x" * 201):
            r = await c.get(f"/v1/jobs/{JOB}/items", params={"q": q})
            assert r.status_code == 422, r.text
            assert r.json()["error"]["code"] == "invalid_request"
            assert "q" in r.json()["error"]["message"]
        assert len(await listed(c, q="x" * 200)) == 0


# --- rows: marked bad -------------------------------------------------------------------------


def export_rows(r: httpx.Response, fmt: str) -> list[Any]:
    assert r.status_code == 200, r.text
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_table(io.BytesIO(r.content)).to_pylist())
    return [json.loads(x) for x in r.text.splitlines() if x]


async def test_a_row_marked_bad_leaves_every_export_and_comes_back(env: Env) -> None:
    async with env.client() as c:
        rows = await listed(c)
        hamlet = next(r for r in rows if r["instruction"] == "Who wrote Hamlet?")
        r = await c.post(f"/v1/jobs/{JOB}/items/{hamlet['seq']}/bad", json={"bad": True})
        assert r.status_code == 200, r.text
        assert r.json() == {**hamlet, "bad": True}

        # Listed (so that it can be unmarked), with bad=true; searchable too.
        after = await listed(c)
        assert [(x["seq"], x["bad"]) for x in after] == [
            (x["seq"], x["seq"] == hamlet["seq"]) for x in rows
        ]
        assert (await listed(c, q="hamlet"))[0]["bad"] is True

        status = (await c.get(f"/v1/jobs/{JOB}")).json()
        assert (status["rows"], status["bad_rows"]) == (len(ROWS) - 1, 1)

        for fmt in FORMATS:
            got = export_rows(await c.get(f"/v1/jobs/{JOB}/export", params={"format": fmt}), fmt)
            assert len(got) == len(ROWS) - 1, fmt
            assert "Hamlet" not in json.dumps(got), fmt
            assert "photosynthesis" in json.dumps(got), fmt

        # The object-store export (what the trainer reads) leaves it out too.
        r = await c.post(f"/v1/jobs/{JOB}/export")
        assert r.status_code == 200, r.text
        base = env.objects / "jobs" / JOB / "export"
        written = (base / "instructions.jsonl").read_text()
        assert len(written.splitlines()) == len(ROWS) - 1 and "Hamlet" not in written
        assert (
            not (base / "trivia.jsonl").exists()
            or "Hamlet" not in (base / "trivia.jsonl").read_text()
        )
        manifest = json.loads((base / "manifest.json").read_text())
        assert "trivia" not in manifest["counts"]

        # Kept in the store: unmarking restores it everywhere.
        r = await c.post(f"/v1/jobs/{JOB}/items/{hamlet['seq']}/bad", json={"bad": False})
        assert r.status_code == 200 and r.json()["bad"] is False
        status = (await c.get(f"/v1/jobs/{JOB}")).json()
        assert (status["rows"], status["bad_rows"]) == (len(ROWS), 0)
        got = export_rows(await c.get(f"/v1/jobs/{JOB}/export"), "airoboros")
        assert "Who wrote Hamlet?" in [x["instruction"] for x in got]
        assert all(x["bad"] is False for x in await listed(c))


async def test_marking_bad_answers_404_and_422(env: Env) -> None:
    async with env.client() as c:
        seq = (await listed(c))[0]["seq"]
        async with env.client(OTHER) as o:
            other_seq = (await listed(o, job=OTHER_JOB))[0]["seq"]
        for path in (
            f"/v1/jobs/nope/items/{seq}/bad",  # no such job
            f"/v1/jobs/{JOB}/items/{seq + 1000}/bad",  # no such row
            f"/v1/jobs/{JOB}/items/{other_seq}/bad",  # a row, of another job
            f"/v1/jobs/{OTHER_JOB}/items/{other_seq}/bad",  # another owner's job
        ):
            r = await c.post(path, json={"bad": True})
            assert r.status_code == 404, (path, r.text)
            assert r.json()["error"]["code"] == "not_found"
        for body in ({}, {"bad": "yes"}, {"bad": 1}, {"bad": True, "why": "typo"}, [True]):
            r = await c.post(f"/v1/jobs/{JOB}/items/{seq}/bad", json=body)
            assert r.status_code == 422, (body, r.text)
            assert r.json()["error"]["type"] == "invalid_request_error"
        r = await c.post(f"/v1/jobs/{JOB}/items/{seq}/bad", content=b"not json")
        assert r.status_code == 422
        for bad_seq in ("abc", "-1", str(2**31)):
            r = await c.post(f"/v1/jobs/{JOB}/items/{bad_seq}/bad", json={"bad": True})
            assert r.status_code == 422, (bad_seq, r.text)
        r = await c.post(
            f"/v1/jobs/{JOB}/items/{seq}/bad", json={"bad": True}, headers=auth("wrong")
        )
        assert r.status_code == 401
        # Nothing above marked anything.
        assert all(x["bad"] is False for x in await listed(c))
        assert (await c.get(f"/v1/jobs/{JOB}")).json()["bad_rows"] == 0


async def test_another_key_can_neither_see_nor_mark_the_rows(env: Env) -> None:
    async with env.client() as owner, env.client(OTHER) as other, env.client(ADMIN) as admin:
        seq = (await listed(owner))[0]["seq"]
        r = await other.get(f"/v1/jobs/{JOB}/items", params={"q": "photosynthesis"})
        assert r.status_code == 404
        r = await other.post(f"/v1/jobs/{JOB}/items/{seq}/bad", json={"bad": True})
        assert r.status_code == 404
        assert r.json()["error"]["message"] == f"no job {JOB!r}"  # as for no job at all
        assert (await listed(owner))[0]["bad"] is False
        # An admin key acts on every job.
        r = await admin.post(f"/v1/jobs/{JOB}/items/{seq}/bad", json={"bad": True})
        assert r.status_code == 200 and r.json()["bad"] is True
        assert (await listed(owner))[0]["bad"] is True


# --- experts and pods ---------------------------------------------------------------------------


async def register_experts(env: Env) -> None:
    reg = env.seed.registry
    await reg.register("code", "v1", base_model="tiny", job_id=JOB, dataset_uri="s3://b/ds1")
    await reg.finish("code", "v1", status="published", uri="s3://b/code-v1", metrics={"loss": 0.5})
    await reg.register("cooking", "v1", base_model="tiny", job_id=JOB, dataset_uri="s3://b/ds1")
    await reg.finish("cooking", "v1", status="failed", detail="out of memory")
    await reg.register("astronomy", "v1", base_model="tiny", job_id=OTHER_JOB)
    await reg.register("legacy", "v0", base_model="tiny")  # trained on no job of the API


@pytest.fixture
def router(embedder: Any, tmp_path: Path) -> Iterator[tuple[str, FakeBackend]]:
    """A real router (its app under uvicorn) in front of a fake OpenAI-compatible pod that
    holds the three experts, and of a pod that is down; it takes the keys KEY and OTHER."""
    package = write_package(tmp_path / "lmoe")
    pod = FakeBackend(models=EXPERTS, chunks=5, chunk_delay=0.3)
    with BackendThread(pod) as served:
        down = f"http://127.0.0.1:{free_port()}"
        with serve_router(
            embedder,
            backends=[served.url, down],
            lmoe=str(package),
            api_keys=f"{KEY},{OTHER}",
            backend_connect_timeout=1.0,
        ) as url:
            yield url, pod


async def test_experts_are_filtered_by_owner_and_pods_come_from_the_router(
    topics: Any, router: tuple[str, FakeBackend]
) -> None:
    url, _ = router
    env = await topics(router_url=url)
    await register_experts(env)
    async with env.client() as c, env.client(ADMIN) as admin:
        r = await c.get("/v1/experts")
        assert r.status_code == 200, r.text
        body = r.json()
        assert sorted((e["expert"], e["status"]) for e in body["data"]) == [
            ("code", "published"),
            ("cooking", "failed"),
        ]
        code = next(e for e in body["data"] if e["expert"] == "code")
        assert code["metrics"] == {"loss": 0.5} and code["uri"] == "s3://b/code-v1"
        assert code["job_id"] == JOB and code["dataset_uri"] == "s3://b/ds1"
        assert code["base_model"] == "tiny" and code["created_at"]
        cooking = next(e for e in body["data"] if e["expert"] == "cooking")
        assert cooking["detail"] == "out of memory"
        assert body["router"] == url and body["pods_error"] is None
        up, down = body["pods"]
        assert up["healthy"] is True and sorted(up["adapters"]) == sorted(EXPERTS)
        assert up["outstanding"] == 0 and up["url"].endswith("/v1")
        assert down["healthy"] is False and down["adapters"] == [] and down["error"]

        everything = (await admin.get("/v1/experts")).json()["data"]
        assert sorted(e["expert"] for e in everything) == [
            "astronomy",
            "code",
            "cooking",
            "legacy",
        ]
        async with env.client(OTHER) as o:
            other = (await o.get("/v1/experts")).json()["data"]
        assert [e["expert"] for e in other] == ["astronomy"]
        assert (await c.get("/v1/experts", headers=auth("wrong"))).status_code == 401
    await env.seed.close()


async def test_experts_without_a_router_and_with_one_that_is_down(topics: Any) -> None:
    env = await topics()
    await register_experts(env)
    async with env.client() as c:
        body = (await c.get("/v1/experts")).json()
        assert body["router"] is None and body["pods"] == [] and body["pods_error"] is None
        assert len(body["data"]) == 2
    await env.seed.close()

    closed = f"http://127.0.0.1:{free_port()}"
    env = await topics(router_url=closed)
    async with env.client() as c:
        r = await c.get("/v1/experts")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["pods"] == [] and body["router"] == closed
        assert body["pods_error"].startswith(f"the router at {closed} cannot be reached")
        assert len(body["data"]) == 2  # the registry is still shown
    await env.seed.close()


# --- the playground -------------------------------------------------------------------------------


def chat(model: str, text: str, **more: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **more}


async def test_playground_streams_from_the_router_event_by_event(
    topics: Any, router: tuple[str, FakeBackend]
) -> None:
    url, pod = router
    env = await topics(router_url=url)
    async with env.client() as c:
        started = time.monotonic()
        arrivals: list[float] = []
        text = b""
        async with c.stream(
            "POST",
            "/v1/playground/chat/completions",
            json=chat("cooking", "A recipe for soup?", stream=True),
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-airoboros-expert"] == "cooking"
            assert r.headers["x-airoboros-route"] == "explicit"
            async for chunk in r.aiter_bytes():
                arrivals.append(time.monotonic() - started)
                text += chunk
        events = [e.removeprefix("data: ") for e in text.decode().split("\n\n") if e.strip()]
        assert events[-1] == "[DONE]"
        words = "".join(
            json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]
        )
        assert words.split() == ["cooking", "answers", "from", "backend", "part0"]
        # The pod sends a chunk every 0.3 s: the first reached the client long before the
        # last was sent (not buffered into one answer).
        assert arrivals[0] < arrivals[-1] - 0.6, arrivals
        # The body went to the pod as sent (the router set the model to the expert).
        sent = pod.requests[-1][1]
        assert sent["messages"] == chat("cooking", "A recipe for soup?")["messages"]
    await env.seed.close()


async def test_playground_passes_answers_and_errors_back(
    topics: Any, router: tuple[str, FakeBackend]
) -> None:
    url, _ = router
    env = await topics(router_url=url)
    async with env.client() as c:
        r = await c.post("/v1/playground/chat/completions", json=chat("code", "A trie in Rust?"))
        assert r.status_code == 200, r.text
        assert r.headers["x-airoboros-expert"] == "code"
        body = r.json()
        assert body["expert"] == "code" and body["usage"]["total_tokens"] > 0
        assert body["choices"][0]["message"]["content"].startswith("code answers")
        # The router's own errors come back with their status and envelope.
        r = await c.post("/v1/playground/chat/completions", json=chat("poetry", "A sonnet?"))
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"
        r = await c.post("/v1/playground/chat/completions", json={"messages": "nope"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        # Authenticated and size-capped like every route.
        r = await c.post(
            "/v1/playground/chat/completions", json=chat("code", "x"), headers=auth("wrong")
        )
        assert r.status_code == 401
        big = chat("code", "x" * (3 * 1024 * 1024))
        r = await c.post("/v1/playground/chat/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    await env.seed.close()


async def test_playground_sends_the_operators_router_key_when_set(
    topics: Any, router: tuple[str, FakeBackend]
) -> None:
    url, _ = router
    # ADMIN is a topics key the router does not take: forwarded, it is refused (and the
    # console is told it is the router's refusal, not a bad topics key) ...
    env = await topics(router_url=url)
    async with env.client(ADMIN) as c:
        r = await c.post("/v1/playground/chat/completions", json=chat("code", "hi"))
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "router_unauthorized"
        assert "HTTP 401" in r.json()["error"]["message"]
        pods = (await c.get("/v1/experts")).json()
        assert pods["pods"] == [] and "HTTP 401" in pods["pods_error"]
    await env.seed.close()
    # ... and with the operator's key for the router, it goes through.
    env = await topics(router_url=url, router_api_key=f"{OTHER},spare")
    async with env.client(ADMIN) as c:
        r = await c.post("/v1/playground/chat/completions", json=chat("code", "hi"))
        assert r.status_code == 200, r.text
        assert len((await c.get("/v1/experts")).json()["pods"]) == 2
    await env.seed.close()


async def test_playground_is_503_without_a_router_or_with_one_down(topics: Any) -> None:
    env = await topics()
    async with env.client() as c:
        r = await c.post("/v1/playground/chat/completions", json=chat("code", "hi"))
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "router_not_configured" and "AIROBOROS_ROUTER_URL" in err["message"]
        assert r.headers["retry-after"]
    await env.seed.close()
    closed = f"http://127.0.0.1:{free_port()}"
    env = await topics(router_url=closed)
    async with env.client() as c:
        r = await c.post("/v1/playground/chat/completions", json=chat("code", "hi", stream=True))
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "router_unavailable"
        assert closed in r.json()["error"]["message"]
    await env.seed.close()


async def test_the_client_cannot_choose_where_the_playground_goes(
    topics: Any, router: tuple[str, FakeBackend]
) -> None:
    url, pod = router
    elsewhere = FakeBackend(models=EXPERTS, name="elsewhere")
    with BackendThread(elsewhere) as other:
        env = await topics(router_url=url)
        body = chat(
            "code",
            "hi",
            router_url=other.url,
            base_url=f"{other.url}/v1",
            api_base=f"{other.url}/v1",
            url=f"{other.url}/v1/chat/completions",
        )
        headers = {
            "x-router-url": other.url,
            "x-forwarded-host": other.url.removeprefix("http://"),
            "forwarded": f"host={other.url.removeprefix('http://')}",
        }
        async with env.client() as c:
            r = await c.post("/v1/playground/chat/completions", json=body, headers=headers)
            assert r.status_code == 200, r.text
            r = await c.get("/v1/experts", headers=headers, params={"router": other.url})
            assert r.json()["router"] == url
        assert elsewhere.requests == []  # nothing went there
        assert pod.requests[-1][1]["messages"] == body["messages"]  # the configured one
        assert r.json()["pods"][0]["url"] != f"{other.url}/v1"
    await env.seed.close()


async def inference_like_pod(scope: Any, receive: Any, send: Any) -> None:
    """A pod that lists its models as the inference service and vLLM do: the base model
    with ``parent: null``, each adapter with the base as its parent."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    cards = [
        {"id": "tiny-base", "object": "model", "created": 0, "owned_by": "x", "parent": None},
        {"id": "cooking", "object": "model", "created": 0, "owned_by": "x", "parent": "tiny-base"},
        {"id": "code", "object": "model", "created": 0, "owned_by": "x", "parent": "tiny-base"},
    ]
    body = json.dumps({"object": "list", "data": cards}).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def test_router_pods_name_the_adapters_without_the_base_model(embedder: Any) -> None:
    with (
        BackendThread(inference_like_pod) as pod,
        serve_router(embedder, backends=[pod.url], api_keys=KEY) as url,
    ):
        r = httpx.get(f"{url}/v1/pods", headers=auth(KEY))
        assert r.status_code == 200, r.text
        [listed_pod] = r.json()["data"]
        assert listed_pod == {
            "url": f"{pod.url}/v1",
            "healthy": True,
            "outstanding": 0,
            "adapters": ["code", "cooking"],
            "models": ["code", "cooking", "tiny-base"],
            "error": None,
        }
        assert httpx.get(f"{url}/v1/pods").status_code == 401
        assert httpx.get(f"{url}/v1/pods", headers=auth("wrong")).status_code == 401
