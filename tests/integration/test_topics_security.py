"""The topics API against a hostile client: nothing it names is read or called with the
server's credentials, hostile bodies get a 4xx with nothing stored, and jobs belong to
the key that created them. In process (SQLite, the in-process bus, a local folder) with
real HTTP to scripted LLM servers on loopback that record what reaches them."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from airoboros.bus import InMemoryBus
from airoboros.errors import ConfigError
from airoboros.llm.filters import ResponseFilter
from airoboros.objects import LocalObjectStore
from airoboros.settings import GeneratorSettings, TopicsSettings
from airoboros.store import SqlStore
from airoboros.topics.app import create_app
from airoboros.topics.service import TopicsService
from airoboros.worker import job_config

KEY, OTHER, ADMIN = "key-alice", "key-bob", "key-admin"
SERVER_KEY = "sk-the-servers-own-key"
#: 414 bytes of YAML that expand to 10**9 strings ("billion laughs")
ALIAS_BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
    "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    "h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n"
    "i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n"
)


class Env:
    def __init__(self, svc: TopicsService, app: Any, own: Any, foreign: Any) -> None:
        self.svc, self.app = svc, app
        #: the server's own endpoint (OPENAI_BASE_URL) and a stranger's
        self.own, self.foreign = own, foreign

    def client(self, key: str | None = KEY) -> httpx.AsyncClient:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://topics", headers=headers
        )


async def make_env(tmp_path: Path, llm_server: Any, *, foreign: Any = None, **settings: Any) -> Env:
    own, foreign = llm_server(), foreign or llm_server()
    s = TopicsSettings(
        api_keys=f"{KEY},{OTHER}",
        admin_api_keys=ADMIN,
        openai_api_key=SERVER_KEY,
        openai_base_url=own.base_url,
        work_dir=str(tmp_path / "work"),
        **settings,
    )
    tmp_path.mkdir(parents=True, exist_ok=True)
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'store.sqlite'}")
    await store.connect()
    svc = TopicsService(s, store, InMemoryBus(), LocalObjectStore(tmp_path / "objects"))
    return Env(svc, create_app(s, service=svc), own, foreign)


@pytest.fixture
async def env(tmp_path: Path, llm_server: Any) -> AsyncIterator[Env]:
    e = await make_env(tmp_path, llm_server)
    yield e
    await e.svc.store.close()


def job(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4", "topics": ["a", "b"], "instructors": {"joke": {"count": 2}}, **extra}


def problems(r: httpx.Response) -> list[str]:
    assert r.status_code == 422, r.text
    return list(r.json()["error"]["problems"])


# --- the server's key goes only to the server's endpoint --------------------------------


async def test_a_client_url_is_refused_and_never_called(env: Env) -> None:
    async with env.client() as c:
        for path in ("/v1/jobs", "/v1/topics:generate"):
            r = await c.post(path, json=job(base_url=env.foreign.base_url, topic_prompt="x"))
            assert any(p.startswith("base_url: not an endpoint") for p in problems(r))
        # A closed port reads the same as an open one: no port scanner.
        closed = await c.post("/v1/jobs", json=job(base_url="http://127.0.0.1:9/v1"))
        opened = await c.post("/v1/jobs", json=job(base_url=env.foreign.base_url))
        assert closed.json()["error"]["message"] == opened.json()["error"]["message"]
        assert (await c.get("/v1/jobs")).json()["data"] == []  # nothing stored
    assert env.foreign.llm.stats["requests"] == 0 and env.foreign.llm.authorizations == []


async def test_an_allowed_client_url_never_gets_the_servers_key(
    tmp_path: Path, llm_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The environment has the server's key too: it must not be picked up either.
    monkeypatch.setenv("OPENAI_API_KEY", SERVER_KEY)
    stranger = llm_server()
    foreign = stranger.base_url
    e = await make_env(tmp_path, llm_server, foreign=stranger, allowed_base_urls=foreign)
    body = job(base_url=foreign, topic_prompt="Give me a numbered list of 5 topics.")
    async with e.client() as c:
        r = await c.post("/v1/topics:generate", json=body)
        assert r.status_code == 200, r.text
        r = await c.post("/v1/topics:generate", json={**body, "openai_api_key": "sk-jobs-own"})
        assert r.status_code == 200, r.text
        # No base_url: the server's own endpoint, with the server's key.
        r = await c.post("/v1/topics:generate", json=job(topic_prompt="a numbered list of topics"))
        assert r.status_code == 200, r.text
    seen = e.foreign.llm.authorizations
    assert seen and all(SERVER_KEY not in h for h in seen)
    assert "Bearer sk-jobs-own" in seen
    assert all(h == f"Bearer {SERVER_KEY}" for h in e.own.llm.authorizations)
    await e.svc.store.close()


def test_a_stored_config_with_a_foreign_url_gets_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SERVER_KEY)
    base = {"openai_api_key": SERVER_KEY, "openai_base_url": "http://127.0.0.1:1/v1"}
    strict = GeneratorSettings(**base)
    with pytest.raises(ConfigError, match="not an endpoint"):
        job_config(strict, job(base_url="http://127.0.0.1:2/v1"))
    allowed = GeneratorSettings(**base, allowed_base_urls="http://127.0.0.1:2/v1")
    cfg = job_config(allowed, job(base_url="http://127.0.0.1:2/v1/", openai_api_key="leak?"))
    assert cfg.resolved_base_url() == "http://127.0.0.1:2/v1/"
    assert cfg.resolved_api_key() is None  # not the server's, not the environment's
    own = job_config(allowed, job(), api_key=None)
    assert (own.resolved_base_url(), own.resolved_api_key()) == (
        base["openai_base_url"],
        SERVER_KEY,
    )


# --- no server path from a client --------------------------------------------------------


async def test_no_path_on_the_server_is_read(env: Env, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "secret.txt").write_text("CANARY-4711 " * 100)
    missing = tmp_path / "nothing-here"
    cases = [
        {"instructors": {"documents": {"count": 2, "documents_path": str(canary)}}},
        {"instructors": {"joke": {"count": 2, "prompt_path": str(canary / "secret.txt")}}},
        {"instructors": {"joke": {"count": 2, "response_prompt_path": "/etc/passwd"}}},
        {"embedding_model": str(canary)},
        {"judge": {"prompt_path": str(canary / "secret.txt")}},
        {"instructors": {"detailed_writing": {"count": 1, "seed_path": str(canary)}}},
    ]
    async with env.client() as c:
        for case in cases:
            r = await c.post("/v1/jobs", json={**job(), **case})
            assert r.status_code == 422, (case, r.text)
            assert "CANARY" not in r.text
        # Existing or not, the same answer: no oracle for the server's disk.
        there = await c.post(
            "/v1/jobs", json=job(instructors={"joke": {"prompt_path": str(canary / "secret.txt")}})
        )
        absent = await c.post(
            "/v1/jobs", json=job(instructors={"joke": {"prompt_path": str(missing)}})
        )
        assert there.json()["error"]["message"] == absent.json()["error"]["message"]
        assert (await c.get("/v1/jobs")).json()["data"] == []


async def test_paths_inside_an_allowed_root_are_read(tmp_path: Path, llm_server: Any) -> None:
    root = tmp_path / "shared-prompts"
    root.mkdir()
    (root / "joke.txt").write_text("Tell {batch_size} jokes as QUESTION: ... ANSWER: ... pairs.")
    e = await make_env(tmp_path, llm_server, allowed_paths=str(root))
    async with e.client() as c:
        r = await c.post(
            "/v1/jobs", json=job(instructors={"joke": {"count": 2, "prompt_path": "joke.txt"}})
        )
        assert r.status_code == 201, r.text
        escape = await c.post(
            "/v1/jobs", json=job(instructors={"joke": {"prompt_path": "../canary"}})
        )
        assert escape.status_code == 422
    await e.svc.store.close()


# --- hostile bodies get a 4xx, nothing is stored -------------------------------------------


async def test_a_yaml_alias_bomb_is_refused_fast_with_bounded_memory(env: Env) -> None:
    assert len(ALIAS_BOMB.encode()) < 500
    tracemalloc.start()
    t0 = time.monotonic()
    async with env.client() as c:
        r = await c.post(
            "/v1/jobs", content=ALIAS_BOMB, headers={"content-type": "application/yaml"}
        )
        elapsed = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert "aliases" in " ".join(problems(r))
        assert elapsed < 1.0 and peak < 50 * 2**20
        assert (await c.get("/v1/jobs")).json()["data"] == []


def test_a_catastrophic_filter_cannot_hang_matching() -> None:
    # Python's re takes exponential time on this pattern with this text; RE2 is linear.
    f = ResponseFilter([r"(\w+\s?)*!"])
    t0 = time.monotonic()
    assert f.reason("a" * 20_000 + " x", finish_reason="stop") is None
    assert time.monotonic() - t0 < 0.5


async def test_filters_rre2_cannot_run_are_refused_by_name(env: Env) -> None:
    async with env.client() as c:
        r = await c.post("/v1/jobs", json=job(response_filters=["ok", r"(?=lookahead)", r"(a)\1"]))
        got = problems(r)
        assert any(p.startswith("response_filters.1: not a usable regular expression") for p in got)
        assert any(p.startswith("response_filters.2:") for p in got)
        ok = await c.post("/v1/jobs", json=job(response_filters=[r"(\w+\s?)*!", "as an? ai"]))
        assert ok.status_code == 201, ok.text


async def test_malformed_bodies_are_4xx_never_5xx(env: Env) -> None:
    deep_json = "[" * 5000 + "]" * 5000
    deep_yaml = "a:\n" + "".join("  " * i + "- \n" for i in range(1, 200))
    async with env.client() as c:
        for body, ctype in [
            (deep_json, "application/json"),
            ("x: " + "[" * 5000 + "]" * 5000, "application/yaml"),
            (deep_yaml, "application/yaml"),
            ('{"instructors": {"riddle": "x"}}', "application/json"),
            ('{"instructors": [1]}', "application/json"),
            ('{"instructors": true}', "application/json"),
            ("not: [valid", "application/yaml"),
            ("{", "application/json"),
            ("", "application/yaml"),
            ('{"instructors": {"joke": {"count": 1000000000}}}', "application/json"),
            ('{"default_batch_size": 5000, "instructors": {"joke": {}}}', "application/json"),
            (
                '{"api_params": {"extra_headers": {"x": "1"}}, "instructors": {"joke": {}}}',
                "application/json",
            ),
            ('{"instructors": {"joke": {"api_params": {"n": 50}}}}', "application/json"),
        ]:
            r = await c.post("/v1/jobs", content=body, headers={"content-type": ctype})
            assert r.status_code == 422, (body[:60], r.status_code, r.text[:200])
            assert r.json()["error"]["type"] == "invalid_request_error"
        r = await c.get("/v1/jobs/whatever/items", params={"after": 2**31})
        assert r.status_code == 422
        assert (await c.get("/v1/jobs")).json()["data"] == []


async def test_a_huge_body_is_refused_before_it_is_read(env: Env) -> None:
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        chunk = b"x" * 65536
        for _ in range(100 * 16):  # 100 MiB
            sent += len(chunk)
            yield chunk

    async with env.client() as c:
        declared = await c.post(
            "/v1/jobs",
            content=b"x: 1",
            headers={"content-type": "application/yaml", "content-length": str(100 * 2**20)},
        )
        assert declared.status_code == 413
        streamed = await c.post(
            "/v1/jobs", content=body(), headers={"content-type": "application/yaml"}
        )
        assert streamed.status_code == 413
        assert sent <= 3 * 2**20  # stopped just past the 2 MiB limit, not at 100 MiB


# --- who sees what ---------------------------------------------------------------------------


async def test_jobs_belong_to_the_key_that_created_them(env: Env) -> None:
    async with env.client(KEY) as alice, env.client(OTHER) as bob, env.client(ADMIN) as admin:
        r = await alice.post("/v1/jobs", json=job(instructors={"joke": {"count": 10_000}}))
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        assert [j["id"] for j in (await alice.get("/v1/jobs")).json()["data"]] == [job_id]
        assert (await bob.get("/v1/jobs")).json()["data"] == []
        for method, path in [
            ("GET", f"/v1/jobs/{job_id}"),
            ("POST", f"/v1/jobs/{job_id}/cancel"),
            ("POST", f"/v1/jobs/{job_id}/resume"),
            ("GET", f"/v1/jobs/{job_id}/items"),
            ("GET", f"/v1/jobs/{job_id}/export"),
            ("POST", f"/v1/jobs/{job_id}/export"),
            ("POST", f"/v1/jobs/{job_id}/cull"),
        ]:
            got = await bob.request(method, path)
            assert got.status_code == 404, (method, path, got.text)
        assert [j["id"] for j in (await admin.get("/v1/jobs")).json()["data"]] == [job_id]
        assert (await admin.post(f"/v1/jobs/{job_id}/cancel")).status_code == 200
        assert (await alice.get(f"/v1/jobs/{job_id}")).json()["status"] == "cancelled"


async def test_the_spec_and_its_pages_need_the_key(
    env: Env, tmp_path: Path, llm_server: Any
) -> None:
    async with env.client(None) as anonymous, env.client() as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert (await anonymous.get(path)).status_code == 401, path
            assert (await c.get(path)).status_code == 200, path
        spec = (await c.get("/openapi.json")).json()
        # Every body is declared, so that fuzzers (and clients) can reach them.
        for path in ("/v1/jobs", "/v1/topics:generate", "/v1/documents"):
            assert "requestBody" in spec["paths"][path]["post"], path
        assert (await anonymous.get("/healthz")).status_code == 200
    opened = await make_env(tmp_path / "open", llm_server, public_docs=True)
    async with opened.client(None) as anonymous:
        assert (await anonymous.get("/openapi.json")).status_code == 200
        assert (await anonymous.get("/v1/jobs")).status_code == 401
    await opened.svc.store.close()


async def test_an_unexpected_error_and_an_outage_answer_in_the_envelope(env: Env) -> None:
    async with env.client() as c:
        r = await c.post("/v1/jobs", json=job())
        job_id = r.json()["id"]
        await env.svc.store.close()  # the database goes away under the API
        env.svc.store.url = "postgresql+asyncpg://nobody@127.0.0.1:9/none"
        await env.svc.store.connect(migrate=False)
        r = await c.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["code"] in ("unavailable", "store_unavailable")


# --- documents come in through the API ---------------------------------------------------------


async def test_documents_are_uploaded_and_used_by_their_owner_only(env: Env) -> None:
    text = (
        "The lighthouse of Valmora was rebuilt in 1884 by engineers from Genoa. " * 8 + "\n\n"
    ) * 3
    async with env.client() as alice, env.client(OTHER) as bob:
        r = await alice.post(
            "/v1/documents", files=[("files", ("harbour.txt", text.encode(), "text/plain"))]
        )
        assert r.status_code == 201, r.text
        upload = r.json()
        assert upload["files"] == [{"name": "harbour.txt", "bytes": len(text.encode())}]
        assert upload["passages"] >= 1
        body = job(instructors={"documents": {"count": 1, "documents_upload": upload["id"]}})
        assert (await alice.post("/v1/jobs", json=body)).status_code == 201
        refused = await bob.post("/v1/jobs", json=body)
        assert any("no upload" in p for p in problems(refused))
        for files in (
            [("files", ("tool.exe", b"MZ\x90\x00", "application/octet-stream"))],
            [("files", ("fake.pdf", b"not a pdf", "application/pdf"))],
            [("files", ("../../etc/cron.txt", text.encode(), "text/plain"))],
            [("files", ("binary.txt", b"\x00\x01\x02", "text/plain"))],
        ):
            assert (await alice.post("/v1/documents", files=files)).status_code == 422, files
        assert (await alice.post("/v1/documents", content=b"x")).status_code == 422
