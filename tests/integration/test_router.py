"""The router over real HTTP, with OpenAI's SDK as the client and real OpenAI-compatible
servers as backends: the project's scripted server (tests/fakes/llm_server.py) and a small
streaming one (tests/fakes/openai_backend.py). RabbitMQ on 127.0.0.1:5672 for the live
update through the bus; moto's S3 server for object-store packages."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from airoboros.contracts import AdapterPublished
from airoboros.router.app import create_app, make_reader
from airoboros.router.routing import Router
from airoboros.router.settings import RouterSettings
from tests.fakes import routing_samples
from tests.fakes.llm_server import Script, ScriptedLLM, ServerThread
from tests.fakes.openai_backend import BackendThread, FakeBackend

KEY = "router-test-key"
EXPERTS = ("code", "cooking", "astronomy")
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


FUNCTION_SAMPLES = [
    "A chat. Choose the right function for the request below from the available functions "
    "(search, calendar, file_reader) and answer in JSON.",
    "A chat. As an agent, select the best tool and its parameters from this YAML list: "
    "weather_lookup, csv_analyzer, email_sender.",
]


def write_package(root: Path, experts: tuple[str, ...] = EXPERTS, n: int = 30) -> Path:
    for e in experts:
        (root / "adapters" / e).mkdir(parents=True)
        (root / "adapters" / e / "description.txt").write_text(f"questions about {e}\n")
        (root / "routing_data").mkdir(exist_ok=True)
        texts = FUNCTION_SAMPLES if e == "function" else routing_samples.samples(e, n)
        rows = [json.dumps({"instruction": t}) for t in texts]
        (root / "routing_data" / f"expert_{e}.jsonl").write_text("\n".join(rows) + "\n")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def package(tmp_path: Path) -> Path:
    return write_package(tmp_path / "lmoe")


@contextmanager
def serve_router(
    embedder: Any, *, router: Router | None = None, ready: bool = True, **kw: Any
) -> Iterator[str]:
    """The router on a free port, with test settings and ``kw`` over them; yields its base
    URL once it is ready."""
    backends = kw.pop("backends", [])
    settings = RouterSettings(
        **{
            "api_keys": KEY,
            "bus": False,
            "health_interval": 60.0,
            "backends": ",".join(backends),
            **kw,
        }
    )
    with BackendThread(create_app(settings, router, embedder=embedder)) as server:
        deadline = time.monotonic() + 60
        while ready and httpx.get(f"{server.url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the router did not become ready"
            time.sleep(0.05)
        yield server.url


@pytest.fixture
def start_router(embedder: Any) -> Iterator[Callable[..., str]]:
    """Factory: ``start_router(backends=[url], lmoe=path, **settings)``; stopped after the test."""
    with ExitStack() as stack:
        yield lambda **kw: stack.enter_context(serve_router(embedder, **kw))


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedLLM, str]]:
    llm = ScriptedLLM(Script(models=EXPERTS))
    with ServerThread(llm) as srv:
        yield llm, srv.base_url


@contextmanager
def fake_backend(**kw: Any) -> Iterator[tuple[FakeBackend, str]]:
    backend = FakeBackend(**kw)
    with BackendThread(backend) as srv:
        yield backend, srv.url


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# --- models and routing -------------------------------------------------------------------------


def test_models_lists_every_expert_and_auto(
    start_router: Any, package: Path, scripted: Any
) -> None:
    _, backend = scripted
    url = start_router(backends=[backend], lmoe=str(package))
    models = {m.id: m for m in client(url).models.list()}
    assert {"auto", *EXPERTS} <= set(models)
    assert models["code"].owned_by == "airoboros"
    assert client(url).models.retrieve("cooking").id == "cooking"
    with pytest.raises(openai.NotFoundError):
        client(url).models.retrieve("poetry")


def test_auto_routes_to_the_expert_the_prompt_resembles(
    start_router: Any, package: Path, scripted: Any
) -> None:
    llm, backend = scripted
    c = client(start_router(backends=[backend], lmoe=str(package), base_models="llama-2-7b"))
    for expert in EXPERTS:
        for query in routing_samples.held_out(expert, 3):
            raw = c.chat.completions.with_raw_response.create(model="auto", messages=ask(query))
            completion = raw.parse()
            assert raw.headers["x-airoboros-expert"] == expert, query
            assert raw.headers["x-airoboros-route"] == "centroid"
            assert (completion.model_extra or {})["expert"] == expert
            assert llm.requests_log[-1][0] == expert  # the backend was asked for the adapter
    # The base model's name routes too (what the original server's clients send), and so
    # does a request without a model.
    done = c.chat.completions.create(model="llama-2-7b", messages=ask("Recipe for pad thai?"))
    assert (done.model_extra or {})["expert"] == "cooking"
    raw = httpx.post(
        f"{c.base_url}chat/completions",
        json={"messages": ask("Recipe for pad thai?")},
        headers={"authorization": f"Bearer {KEY}"},
    )
    assert raw.status_code == 200 and raw.json()["expert"] == "cooking"


def test_routing_uses_the_system_prompt_and_last_user_turn_only(
    start_router: Any, package: Path, scripted: Any
) -> None:
    _, backend = scripted
    c = client(start_router(backends=[backend], lmoe=str(package)))
    history = [
        {"role": "system", "content": "A chat."},
        {"role": "user", "content": "How far away is the Andromeda galaxy?"},
        {"role": "assistant", "content": "About 2.5 million light years."},
        {"role": "user", "content": "Can I see Saturn's rings with binoculars?"},
        {"role": "assistant", "content": "Barely."},
        {"role": "user", "content": "Give me a recipe for lasagna with parmesan."},
    ]
    done = c.chat.completions.create(model="auto", messages=history)  # type: ignore[arg-type]
    assert (done.model_extra or {})["expert"] == "cooking"


def test_completions_route_on_the_last_user_turn(
    start_router: Any, package: Path, scripted: Any
) -> None:
    _, backend = scripted
    c = client(start_router(backends=[backend], lmoe=str(package)))
    prompt = "A chat.\nUSER: what is a quasar?\nASSISTANT: a bright core.\nUSER: Write a Rust function that implements a trie.\nASSISTANT: "
    done = c.completions.create(model="auto", prompt=prompt, max_tokens=16)
    assert (done.model_extra or {})["expert"] == "code"
    assert done.choices[0].text


def test_model_and_expert_field_choose_directly(start_router: Any, package: Path) -> None:
    with fake_backend(models=EXPERTS) as (backend, url):
        c = client(start_router(backends=[url], lmoe=str(package)))
        code_question = "Write a Python function that implements a trie."
        done = c.chat.completions.create(model="cooking", messages=ask(code_question))
        assert (done.model_extra or {})["expert"] == "cooking"
        assert done.choices[0].message.content.startswith("cooking answers")  # type: ignore[union-attr]
        raw = c.chat.completions.with_raw_response.create(
            model="auto", messages=ask(code_question), extra_body={"expert": "astronomy"}
        )
        assert raw.headers["x-airoboros-expert"] == "astronomy"
        assert raw.headers["x-airoboros-route"] == "explicit"
        sent = backend.requests[-1][1]
        assert sent["model"] == "astronomy" and "expert" not in sent
        with pytest.raises(openai.NotFoundError) as exc:
            c.chat.completions.create(
                model="auto", messages=ask("x"), extra_body={"expert": "poetry"}
            )
        assert exc.value.body["param"] == "expert"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(
                model="code", messages=ask("x"), extra_body={"expert": "cooking"}
            )


# --- errors at the front door ----------------------------------------------------------------


def test_unknown_model_is_404_in_openai_envelope(
    start_router: Any, package: Path, scripted: Any
) -> None:
    _, backend = scripted
    url = start_router(backends=[backend], lmoe=str(package))
    with pytest.raises(openai.NotFoundError) as exc:
        client(url).chat.completions.create(model="poetry", messages=ask("hi"))
    body = exc.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}
    assert body["code"] == "model_not_found" and body["param"] == "model"
    raw = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "poetry", "messages": ask("hi")},
        headers={"authorization": f"Bearer {KEY}"},
    )
    assert raw.status_code == 404 and set(raw.json()) == {"error"}
    assert raw.headers["x-should-retry"] == "false"


def test_wrong_or_missing_key_is_401(start_router: Any, package: Path, scripted: Any) -> None:
    _, backend = scripted
    url = start_router(backends=[backend], lmoe=str(package))
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").chat.completions.create(model="auto", messages=ask("hi"))
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").models.list()
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/healthz").status_code == 200  # probes need no key


def test_body_larger_than_the_limit_is_413(start_router: Any, package: Path, scripted: Any) -> None:
    _, backend = scripted
    url = start_router(backends=[backend], lmoe=str(package), max_body_bytes=4096)
    with pytest.raises(openai.APIStatusError) as exc:
        client(url).chat.completions.create(model="auto", messages=ask("x" * 10_000))
    assert exc.value.status_code == 413
    assert exc.value.body["code"] == "request_too_large"  # type: ignore[index]
    # Without a Content-Length (chunked upload) too.
    chunks = iter(
        [b'{"model": "auto", "messages": [{"role": "user", "content": "', b"x" * 8000, b'"}]}']
    )
    raw = httpx.post(
        f"{url}/v1/chat/completions", content=chunks, headers={"authorization": f"Bearer {KEY}"}
    )
    assert raw.status_code == 413


def test_requests_beyond_the_rate_limit_get_429_with_retry_after(
    start_router: Any, package: Path, scripted: Any
) -> None:
    _, backend = scripted
    url = start_router(backends=[backend], lmoe=str(package), rate_limit_per_minute=2)
    c = client(url)
    for _ in range(2):
        c.chat.completions.create(model="code", messages=ask("hi"))
    with pytest.raises(openai.RateLimitError) as exc:
        c.chat.completions.create(model="code", messages=ask("hi"))
    assert 1 <= int(exc.value.response.headers["retry-after"]) <= 31


def test_bad_input_is_a_clear_4xx(start_router: Any, package: Path, scripted: Any) -> None:
    _, backend = scripted
    url = start_router(backends=[backend], lmoe=str(package))
    c = client(url)
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model="auto", messages=[])
    with pytest.raises(openai.BadRequestError, match="system message may only come"):
        c.chat.completions.create(
            model="auto",
            messages=[
                {"role": "user", "content": "hi"},
                {"role": "system", "content": "late"},
                {"role": "user", "content": "again"},
            ],
        )
    with pytest.raises(openai.BadRequestError, match="last message must be from the user"):
        c.chat.completions.create(
            model="auto",
            messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        )
    auth = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    raw = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers=auth)
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    raw = httpx.post(
        f"{url}/v1/completions", json={"model": "auto", "prompt": [1, 2, 3]}, headers=auth
    )
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "prompt"


# --- streaming ---------------------------------------------------------------------------------


def test_a_stream_passes_through_chunk_by_chunk(start_router: Any, package: Path) -> None:
    with fake_backend(models=EXPERTS, chunks=5, chunk_delay=0.25) as (_, url):
        c = client(start_router(backends=[url], lmoe=str(package)))
        raw = c.chat.completions.with_raw_response.create(
            model="auto", messages=ask("Give me a recipe for paella with saffron."), stream=True
        )
        assert raw.headers["x-airoboros-expert"] == "cooking"
        arrivals: list[float] = []
        parts: list[str] = []
        for chunk in raw.parse():
            arrivals.append(time.monotonic())
            parts.append(chunk.choices[0].delta.content or "")
        assert "".join(parts).split() == ["cooking", "answers", "from", "backend", "part0"]
        # Five chunks 0.25 s apart arrive spread out, not all at once at the end.
        assert arrivals[-1] - arrivals[0] >= 0.75
        stream = c.completions.create(model="code", prompt="def f():", stream=True)
        assert len([ch.choices[0].text for ch in stream]) == 5


def test_a_stream_that_breaks_off_raises_the_sdks_api_error(
    start_router: Any, package: Path
) -> None:
    with fake_backend(models=EXPERTS) as (_, url):
        router_url = start_router(backends=[url], lmoe=str(package))
        stream = client(router_url).chat.completions.create(
            model="code", messages=ask("FAIL_MIDWAY please"), stream=True
        )
        got: list[str] = []
        with pytest.raises(openai.APIError, match="broke off"):
            for chunk in stream:
                got.append(chunk.choices[0].delta.content or "")
        assert got == ["code ", "answers "]
        # The pod's in-flight slot was released.
        ready = httpx.get(f"{router_url}/readyz").json()
        assert ready["backends"][0]["outstanding"] == 0


# --- backends -------------------------------------------------------------------------------


def test_backend_errors_are_normalised(start_router: Any, package: Path) -> None:
    with fake_backend(models=EXPERTS) as (_, url):
        c = client(start_router(backends=[url], lmoe=str(package)))
        with pytest.raises(openai.BadRequestError) as bad:
            c.chat.completions.create(model="code", messages=ask("BACKEND_400"))
        assert bad.value.body["message"] == "Input validation error: bad"  # type: ignore[index]
        with pytest.raises(openai.APIStatusError) as gateway:
            c.chat.completions.create(model="code", messages=ask("BACKEND_500"))
        assert gateway.value.status_code == 502 and "kaput" in gateway.value.message
        with pytest.raises(openai.APIStatusError) as unavailable:
            c.chat.completions.create(model="code", messages=ask("BACKEND_503"))
        assert unavailable.value.status_code == 503


def test_a_failed_connect_fails_over_to_another_pod(start_router: Any, package: Path) -> None:
    with fake_backend(models=EXPERTS) as (backend, url):
        gone = BackendThread(FakeBackend(models=EXPERTS)).__enter__()
        # Health checks every minute: the pod stopped below is still believed healthy when
        # the requests meet it.
        router_url = start_router(backends=[gone.url, url], lmoe=str(package))
        gone.__exit__()
        c = client(router_url)
        for _ in range(4):
            done = c.chat.completions.create(model="code", messages=ask("hi"))
            assert done.choices[0].message.content
        stream = c.chat.completions.create(model="code", messages=ask("hi"), stream=True)
        assert len(list(stream)) == 5
        assert len(backend.requests) == 5
        pods = httpx.get(f"{router_url}/readyz").json()["backends"]
        assert [p["healthy"] for p in pods] == [False, True]
    # Every pod gone: 503 in the envelope.
    c = client(start_router(backends=[url], lmoe=str(package)))
    with pytest.raises(openai.APIStatusError) as exc:
        c.chat.completions.create(model="code", messages=ask("hi"))
    assert exc.value.status_code == 503 and "no backend could be reached" in exc.value.message


def test_pods_holding_the_expert_are_preferred(start_router: Any, package: Path) -> None:
    with (
        fake_backend(models=("code",), accept_any=True, name="a") as (a, url_a),
        fake_backend(models=("cooking",), accept_any=True, name="b") as (b, url_b),
    ):
        c = client(start_router(backends=[url_a, url_b], lmoe=str(package)))
        for _ in range(6):
            c.chat.completions.create(model="code", messages=ask("hi"))
            c.chat.completions.create(model="cooking", messages=ask("hi"))
        assert {r[1]["model"] for r in a.requests} == {"code"} and len(a.requests) == 6
        assert {r[1]["model"] for r in b.requests} == {"cooking"} and len(b.requests) == 6
        # A pod learns what it answered for: astronomy sticks to the pod that served it first.
        for _ in range(4):
            c.chat.completions.create(model="astronomy", messages=ask("hi"))
        served = [x.name for x in (a, b) for r in x.requests if r[1]["model"] == "astronomy"]
        assert len(set(served)) == 1 and len(served) == 4


# --- agent routing ------------------------------------------------------------------------


def test_agent_routing_asks_the_function_expert_then_falls_back(
    start_router: Any, tmp_path: Path
) -> None:
    pkg = write_package(tmp_path / "pkg", (*EXPERTS, "function"), n=10)
    with fake_backend(
        models=(*EXPERTS, "function"), replies={"function": '{"function": "astronomy"}'}
    ) as (
        backend,
        url,
    ):
        c = client(start_router(backends=[url], lmoe=str(pkg), agent_router=True))
        raw = c.chat.completions.with_raw_response.create(
            model="auto", messages=ask("Give me a recipe for risotto.")
        )
        assert raw.headers["x-airoboros-expert"] == "astronomy"
        assert raw.headers["x-airoboros-route"] == "agent"
        asked = backend.requests[-2][1]
        assert asked["model"] == "function" and "cooking:" in asked["messages"][1]["content"]
        backend.replies["function"] = "I cannot decide."
        raw = c.chat.completions.with_raw_response.create(
            model="auto", messages=ask("Give me a recipe for risotto.")
        )
        assert raw.headers["x-airoboros-expert"] == "cooking"
        assert raw.headers["x-airoboros-route"] == "centroid"


# --- live updates -------------------------------------------------------------------------


def _astronomy_event(tmp_path: Path) -> AdapterPublished:
    routing = tmp_path / "published" / "expert_astronomy.jsonl"
    routing.parent.mkdir(parents=True)
    routing.write_text(
        "\n".join(json.dumps({"instruction": t}) for t in routing_samples.samples("astronomy", 30))
    )
    return AdapterPublished(
        expert="astronomy",
        version="v2",
        base_model="/models/base",
        uri=str(tmp_path / "published"),
        routing_uri=str(routing),
        description="stars and planets",
    )


def experts(url: str) -> set[str]:
    """The router's own experts (the backends' other models are listed too)."""
    return {m.id for m in client(url).models.list() if m.owned_by == "airoboros"}


def _route(url: str, text: str) -> str:
    raw = client(url).chat.completions.with_raw_response.create(model="auto", messages=ask(text))
    return raw.headers["x-airoboros-expert"]


def test_adapter_published_makes_a_new_expert_routable_without_restart(
    start_router: Any, tmp_path: Path, embedder: Any
) -> None:
    pkg = write_package(tmp_path / "pkg", ("code", "cooking"))
    question = "What is the best season to see Mars through a backyard telescope?"
    router = Router(embedder)
    with fake_backend(models=EXPERTS) as (_, url):
        router_url = start_router(backends=[url], router=router, lmoe=str(pkg))
        assert _route(router_url, question) != "astronomy"
        asyncio.run(router.on_adapter_published(_astronomy_event(tmp_path)))
        assert _route(router_url, question) == "astronomy"
        assert "astronomy" in experts(router_url)


def _broker_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not _broker_up(), reason="no RabbitMQ at 127.0.0.1:5672")
def test_adapter_published_through_rabbitmq(embedder: Any, tmp_path: Path) -> None:
    import aio_pika

    from airoboros.bus_amqp import AmqpBus

    prefix = f"test-router-{uuid.uuid4().hex[:8]}"
    pkg = write_package(tmp_path / "pkg", ("code", "cooking"))
    question = "Tell me three surprising facts about a neutron star for a stargazing club."
    publisher = AmqpBus(AMQP_URL, prefix=prefix)
    names = [q for q in publisher.queue_names(AdapterPublished, "router")]
    names += [f"{n}.dlq" for n in names]
    try:
        # The router stops before the queues are deleted: its robust channel would declare
        # them again.
        with (
            fake_backend(models=EXPERTS) as (_, url),
            serve_router(
                embedder,
                backends=[url],
                lmoe=str(pkg),
                bus=True,
                amqp_url=AMQP_URL,
                amqp_prefix=prefix,
            ) as router_url,
        ):
            deadline = time.monotonic() + 30
            while not httpx.get(f"{router_url}/readyz").json()["bus"]:
                assert time.monotonic() < deadline, "the router did not connect to the broker"
                time.sleep(0.1)
            assert _route(router_url, question) != "astronomy"

            async def publish() -> None:
                await publisher.start()
                try:
                    await publisher.publish(_astronomy_event(tmp_path))
                finally:
                    await publisher.close()

            asyncio.run(publish())
            deadline = time.monotonic() + 30
            while "astronomy" not in experts(router_url):
                assert time.monotonic() < deadline, "adapter.published did not arrive"
                time.sleep(0.1)
            assert _route(router_url, question) == "astronomy"
    finally:

        async def cleanup() -> None:
            conn = await aio_pika.connect(AMQP_URL, timeout=10)
            try:
                for name in names:
                    async with conn.channel() as ch:
                        await ch.queue_delete(name)
                for exchange in (prefix, f"{prefix}.dlx"):
                    async with conn.channel() as ch:
                        await ch.exchange_delete(exchange)
            finally:
                await conn.close()

        asyncio.run(cleanup())


# --- packages in the object store --------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"{host}:{port}"
    finally:
        server.stop()


def test_package_and_events_from_s3(
    start_router: Any, tmp_path: Path, s3_endpoint: str, embedder: Any
) -> None:
    from airoboros.objects_s3 import S3ObjectStore

    bucket = f"t-{uuid.uuid4().hex[:20]}"
    store = S3ObjectStore(s3_endpoint, "test", "test", bucket)
    pkg = write_package(tmp_path / "pkg", ("code", "cooking"))

    async def upload() -> str:
        for p in pkg.rglob("*"):
            if p.is_file():
                await store.put_bytes(f"experts/v1/{p.relative_to(pkg)}", p.read_bytes())
        event = _astronomy_event(tmp_path)
        return await store.put_bytes(
            "experts/v2/routing_data/expert_astronomy.jsonl", Path(event.routing_uri).read_bytes()
        )

    astro_uri = asyncio.run(upload())
    s3 = {"s3_endpoint": s3_endpoint, "s3_access_key": "test", "s3_secret_key": "test"}
    router = Router(embedder, reader=make_reader(RouterSettings(**s3)))
    with fake_backend(models=EXPERTS) as (_, url):
        router_url = start_router(
            backends=[url], router=router, lmoe=f"s3://{bucket}/experts/v1", **s3
        )
        assert experts(router_url) == {"code", "cooking"}
        assert _route(router_url, "Write a Go function that implements an LRU cache.") == "code"
        event = _astronomy_event(tmp_path / "again").model_copy(update={"routing_uri": astro_uri})
        assert astro_uri.startswith("s3://")
        asyncio.run(router.on_adapter_published(event))
        assert _route(router_url, "Describe the orbit and mass of Jupiter.") == "astronomy"
