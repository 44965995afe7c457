"""Schemathesis against the three HTTP APIs (topics, router, inference), in process: every
operation of each OpenAPI spec gets generated requests (examples, coverage, fuzzing;
valid and invalid input), and no answer may be a 5xx or stray from the declared
response schema and media type. A fixed seed (``derandomize``) and a bounded number of
cases keep it deterministic and quick.

Each app is served by schemathesis' in-process ASGI client, on the event loop it runs
its own lifespan in; what an app holds that is bound to a loop (the SQL store, the
engine, the backend pool) is made there too, at start-up.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

schemathesis = pytest.importorskip(
    "schemathesis", reason="schemathesis is not installed (the dev extra pins it: make setup)"
)

from hypothesis import HealthCheck, settings  # noqa: E402  (schemathesis brings hypothesis)
from hypothesis import strategies as st  # noqa: E402
from schemathesis.python import asgi  # noqa: E402

from tests.fakes import routing_samples  # noqa: E402
from tests.fakes.openai_backend import BackendThread, FakeBackend  # noqa: E402

KEY = "fuzz-key"
AUTH = {"authorization": f"Bearer {KEY}"}
#: what every response is checked for
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.content_type_conformance,
]
#: Cases per operation in the fuzzing phase, from a fixed seed (``derandomize``); the
#: examples and coverage phases add a bounded, deterministic set of their own.
FUZZ = settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

ASGIApp = Callable[..., Any]


class BuiltAtStartup:
    """An ASGI app made by ``factory`` (an async context manager) when its lifespan starts,
    in the loop that serves it, and closed when the lifespan ends."""

    def __init__(self, factory: Callable[[], contextlib.AbstractAsyncContextManager[Any]]):
        self.factory = factory
        self.app: ASGIApp | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            assert self.app is not None, "the app is not started"
            await self.app(scope, receive, send)
            return
        startup = await receive()
        async with contextlib.AsyncExitStack() as stack:
            try:
                self.app = await stack.enter_async_context(self.factory())
            except Exception as exc:
                await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                return
            pending = [startup]

            async def replay() -> Any:
                return pending.pop() if pending else await receive()

            try:
                await self.app(scope, replay, send)  # its own lifespan, startup to shutdown
            finally:
                self.app = None


@pytest.fixture(autouse=True)
def _nodeid_attribute(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32.5's ``from_fixture`` reads and rewrites ``node._nodeid`` (to name
    each operation's subtest in reports), an attribute pytest 9.2 replaced with ``_id``;
    without it every lazy-schema test dies with an AttributeError. Pytest reads ``_id``,
    so this copy only gives schemathesis something to save and restore."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def wait_ready(app: ASGIApp, path: str = "/readyz", timeout: float = 60.0) -> None:
    with asgi.get_client(app) as client:
        deadline = time.monotonic() + timeout
        while (r := client.get(path)).status_code != 200:
            assert time.monotonic() < deadline, f"not ready: {r.status_code} {r.text}"
            time.sleep(0.05)


# --- topics ----------------------------------------------------------------------------------

JOB = {"model": "gpt-4", "topics": ["a", "b"], "instructors": {"joke": {"count": 2}}}


@pytest.fixture
def topics_schema(tmp_path: Path, llm_server: Any, embedder: Any) -> Iterator[Any]:
    from airoboros.bus import InMemoryBus
    from airoboros.objects import LocalObjectStore
    from airoboros.settings import TopicsSettings
    from airoboros.store import SqlStore
    from airoboros.topics.app import create_app
    from airoboros.topics.service import TopicsService
    from tests.integration.test_router import serve_router

    own = llm_server()
    jobs: list[str] = []
    # The console's playground and pods go to a real router (in front of a fake pod).
    stack = contextlib.ExitStack()
    pod = stack.enter_context(BackendThread(FakeBackend(EXPERTS, chunks=3)))
    router_url = stack.enter_context(
        serve_router(
            embedder, backends=[pod.url], lmoe=str(write_package(tmp_path / "lmoe")), api_keys=KEY
        )
    )

    @contextlib.asynccontextmanager
    async def topics() -> AsyncIterator[Any]:
        s = TopicsSettings(
            api_keys=KEY,
            openai_api_key="sk-server",
            openai_base_url=own.base_url,
            work_dir=str(tmp_path / "work"),
            router_url=router_url,
        )
        store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'store.sqlite'}")
        await store.connect()
        try:
            svc = TopicsService(s, store, InMemoryBus(), LocalObjectStore(tmp_path / "objects"))
            app = create_app(s, service=svc)
            # A job of the fuzzer's key, so that /v1/jobs/{job_id} paths can name a real one.
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                r = await c.post("/v1/jobs", json=JOB, headers=AUTH)
                assert r.status_code == 201, r.text
                jobs.append(r.json()["id"])
            yield app
        finally:
            await store.close()

    schema = schemathesis.openapi.from_asgi("/openapi.json", BuiltAtStartup(topics), headers=AUTH)

    @schema.hook
    def flatmap_path_parameters(context: Any, params: dict[str, Any] | None) -> Any:
        if not params or "job_id" not in params or not jobs:
            return st.just(params)
        return st.sampled_from([params, {**params, "job_id": jobs[-1]}])

    with stack:
        yield schema


topics = schemathesis.pytest.from_fixture("topics_schema")


@topics.parametrize()
@FUZZ
def test_topics_api(case: Any) -> None:
    case.call_and_validate(headers=AUTH, checks=CHECKS)


# --- router ------------------------------------------------------------------------------------

EXPERTS = ("code", "cooking", "astronomy")


def write_package(root: Path) -> Path:
    for e in EXPERTS:
        (root / "adapters" / e).mkdir(parents=True)
        (root / "adapters" / e / "description.txt").write_text(f"questions about {e}\n")
        (root / "routing_data").mkdir(exist_ok=True)
        rows = [json.dumps({"instruction": t}) for t in routing_samples.samples(e, 10)]
        (root / "routing_data" / f"expert_{e}.jsonl").write_text("\n".join(rows) + "\n")
    return root


def plausible(models: tuple[str, ...], refused: tuple[str, ...] = ()) -> Callable[[Any, Any], Any]:
    """A ``flatmap_body`` hook: half the generated JSON objects are made into requests that
    get past the first checks, the rest are left as generated. A completion gets a model
    that is served, well-formed turns and none of the ``refused`` fields the server turns
    away by design; an adapter to load gets a valid name and one source. Without it a
    random model is only ever a 404 (a random adapter name a 400), and what lies behind
    those checks (the generation, resolving an adapter's path) is never reached."""

    def completion(body: dict[str, Any], model: str) -> dict[str, Any]:
        out = {k: v for k, v in body.items() if k not in refused}
        if "messages" in out:
            given = out["messages"] if isinstance(out["messages"], list) else []
            texts = [m.get("content") for m in given if isinstance(m, dict)] or [None]
            out["messages"] = [  # user and assistant in turn, the user's last
                {
                    "role": "assistant" if (len(texts) - i) % 2 == 0 else "user",
                    "content": t if isinstance(t, str) else "Hello",
                }
                for i, t in enumerate(texts)
            ]
        return {**out, "model": model}

    def adapter(body: dict[str, Any]) -> dict[str, Any]:
        source = "path" if "path" in body or "uri" not in body else "uri"
        other = {"path": "uri", "uri": "path"}[source]
        return {**{k: v for k, v in body.items() if k != other}, "name": "fuzzed"}

    def hook(context: Any, body: Any) -> Any:
        if not isinstance(body, dict):
            return st.just(body)
        if context.operation.path.endswith("/adapters"):
            return st.sampled_from([body, adapter(body)])
        return st.one_of(st.just(body), st.sampled_from(models).map(lambda m: completion(body, m)))

    return hook


@pytest.fixture
def router_schema(tmp_path: Path, embedder: Any) -> Iterator[Any]:
    from airoboros.router.app import create_app
    from airoboros.router.settings import RouterSettings

    with BackendThread(FakeBackend(EXPERTS, chunks=3)) as backend:
        s = RouterSettings(
            api_keys=KEY,
            bus=False,
            backends=backend.url,
            lmoe=str(write_package(tmp_path / "lmoe")),
            health_interval=60.0,
        )
        app = create_app(s, embedder=embedder)
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        # The routing index loads after start-up; until then "auto" gets its documented 503.
        wait_ready(app)
        schema.hook("flatmap_body")(plausible(("auto", *EXPERTS)))
        yield schema


router = schemathesis.pytest.from_fixture("router_schema")


@router.parametrize()
@FUZZ
def test_router_api(case: Any) -> None:
    case.call_and_validate(headers=AUTH, checks=CHECKS)


# --- inference ---------------------------------------------------------------------------------

BASE_ID = "tiny-base"
#: OpenAI fields this server answers with a 400 (unsupported) whenever they are set
REFUSED = (
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "tools",
    "suffix",
    "best_of",
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fakes.tiny_llama import build_tiny_llama

    return Path(build_tiny_llama(tmp_path_factory.mktemp("fuzz-inference") / BASE_ID))


@pytest.fixture
def inference_schema(tmp_path: Path, tiny_model: Path) -> Any:
    from airoboros.inference.app import create_app
    from airoboros.inference.engine import LocalEngine
    from airoboros.inference.settings import InferenceSettings

    s = InferenceSettings(
        base_model=str(tiny_model),
        model_id=BASE_ID,
        cache_dir=str(tmp_path / "cache"),
        adapter_roots=str(tmp_path / "adapters"),
        device="cpu",
        api_keys=KEY,
        # Short generations keep the fuzzing fast; larger requests are lowered to these.
        max_new_tokens=4,
        max_n=4,
        max_body_bytes=64 * 1024,
    )
    app = create_app(s, engine=LocalEngine(s))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    wait_ready(app)
    schema.hook("flatmap_body")(plausible((BASE_ID,), REFUSED))
    return schema


inference = schemathesis.pytest.from_fixture("inference_schema")


@inference.parametrize()
@FUZZ
def test_inference_api(case: Any) -> None:
    case.call_and_validate(headers=AUTH, checks=CHECKS)


# --- the 5xx found so far, pinned --------------------------------------------------------------

FOUND: list[tuple[str, str, str, Any, str]] = [
    # A config that is no mapping reached the policy as it was: 500.
    ("topics_schema", "POST", "/v1/jobs", None, "application/yaml"),
    ("topics_schema", "POST", "/v1/topics:generate", [1, 2], "application/json"),
    # A lone surrogate (no Unicode text) reached the embedding model's tokenizer: 500.
    ("router_schema", "POST", "/v1/completions", {"prompt": "\ud800"}, "application/json"),
    (
        "router_schema",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a \udc00 b"}]},
        "application/json",
    ),
    # top_k beyond 64 bits overflowed the engine's tensor: 500.
    (
        "inference_schema",
        "POST",
        "/v1/completions",
        {"model": BASE_ID, "prompt": "hi", "top_k": 2**70},
        "application/json",
    ),
    # A NUL in an adapter path made resolving it raise ValueError: 500.
    (
        "inference_schema",
        "POST",
        "/v1/adapters",
        {"name": "fuzzed", "path": "a\x00b"},
        "application/json",
    ),
]


@pytest.mark.parametrize(("api", "method", "path", "body", "media_type"), FOUND)
def test_what_was_a_5xx_is_a_4xx(
    request: pytest.FixtureRequest, api: str, method: str, path: str, body: Any, media_type: str
) -> None:
    schema = request.getfixturevalue(api)
    case = schema[path][method].Case(body=body, media_type=media_type)
    response = case.call_and_validate(headers=AUTH, checks=CHECKS)
    assert 400 <= response.status_code < 500, response.text
