"""The router's parts without HTTP: routing texts, the index and its rules, updates, the
agent's answer parsing, the rate limiter, error shapes, the pod order."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from airoboros.contracts import AdapterPublished
from airoboros.errors import InvalidRequest
from airoboros.router.agent import AgentRouter, agent_prompt, parse_choice
from airoboros.router.backends import BackendPod, BackendPool, Stream, api_base, normalise_error
from airoboros.router.limits import ClientRateLimiter
from airoboros.router.package import Reader, parse_routing_jsonl
from airoboros.router.routing import (
    RULES,
    IndexedExpert,
    Router,
    RoutingIndex,
    chat_routing_text,
    prompt_routing_text,
    sample,
)
from airoboros.router.service import RouterService
from tests.fakes import routing_samples

EXPERTS = ("code", "cooking", "astronomy")


def write_package(root: Path, experts: tuple[str, ...] = EXPERTS, n: int = 30) -> Path:
    for e in experts:
        (root / "adapters" / e).mkdir(parents=True)
        (root / "adapters" / e / "description.txt").write_text(f"questions about {e}\n")
        (root / "routing_data").mkdir(exist_ok=True)
        rows = [json.dumps({"instruction": t}) for t in routing_samples.samples(e, n)]
        (root / "routing_data" / f"expert_{e}.jsonl").write_text("\n".join(rows) + "\n")
    return root


# --- the text a request routes on -------------------------------------------------------------


def test_chat_routing_text_is_system_and_last_user_turn() -> None:
    messages = [
        {"role": "system", "content": "You are a chef."},
        {"role": "user", "content": "Tell me about Jupiter."},
        {"role": "assistant", "content": "It is big."},
        {"role": "user", "content": [{"type": "text", "text": "How do I make risotto?"}]},
    ]
    assert chat_routing_text(messages) == "You are a chef. How do I make risotto?"
    # No system message: the trainer's default system prompt, as in the samples.
    assert chat_routing_text([{"role": "user", "content": "hi"}]) == "A chat. hi"


def test_long_turns_are_clipped_head_and_tail() -> None:
    text = chat_routing_text([{"role": "user", "content": "a" * 5000 + "TAIL"}], max_chars=200)
    assert len(text) < 300 and text.endswith("TAIL") and text.startswith("A chat. aaa")


def test_prompt_routing_text_reads_the_airoboros_format() -> None:
    prompt = "A helpful chef.\nUSER: about stars\nASSISTANT: ok\nUSER: bake bread?\nASSISTANT: "
    assert prompt_routing_text(prompt) == "A helpful chef. bake bread?"
    assert prompt_routing_text("plain text prompt") == "plain text prompt"


# --- the index ----------------------------------------------------------------------------------


def _clusters(
    rng: np.random.Generator, sizes: dict[str, int], dim: int = 16
) -> dict[str, IndexedExpert]:
    out = {}
    for i, (name, n) in enumerate(sizes.items()):
        center = np.zeros(dim, dtype=np.float32)
        center[i] = 1.0
        v = center + rng.normal(0, 0.1, (n, dim)).astype(np.float32)
        out[name] = IndexedExpert(name, "", v / np.linalg.norm(v, axis=1, keepdims=True))
    return out


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_finds_the_cluster(rule: Any) -> None:
    rng = np.random.default_rng(0)
    index = RoutingIndex(_clusters(rng, {"a": 50, "b": 5, "c": 200}), k=10)
    for i, name in enumerate(["a", "b", "c"]):
        q = np.zeros(16, dtype=np.float32)
        q[i] = 1.0
        assert index.choose(q, rule)[0] == name


def test_mean_rule_takes_k_nearest_of_each_expert() -> None:
    """The original's rule: per expert, the mean of the min(k, n) best similarities."""
    rng = np.random.default_rng(1)
    experts = _clusters(rng, {"a": 30, "b": 3})
    index = RoutingIndex(experts, k=5)
    q = experts["a"].vectors[0]
    scores = index.scores(q.reshape(1, -1), "mean")[0]
    sims_a = np.sort(experts["a"].vectors @ q)[::-1][:5].mean()
    sims_b = np.sort(experts["b"].vectors @ q)[::-1][:3].mean()
    assert scores == pytest.approx([sims_a, sims_b], abs=1e-5)


def test_experts_without_samples_are_known_but_not_routable() -> None:
    rng = np.random.default_rng(2)
    experts = _clusters(rng, {"a": 5})
    experts["bare"] = IndexedExpert("bare", "", np.zeros((0, 16), dtype=np.float32))
    index = RoutingIndex(experts)
    assert index.routable == ["a"] and "bare" in index.experts
    assert RoutingIndex({}).choose(np.ones(4, dtype=np.float32))[0] is None


def test_sampling_is_capped_seeded_and_stable() -> None:
    texts = [f"t{i}" for i in range(100)] + ["t1"]
    a = sample(texts, 10, 42, "code")
    assert len(a) == 10 and a == sample(texts, 10, 42, "code")
    assert a != sample(texts, 10, 42, "cooking")
    assert sample(texts[:5], 10, 42, "code") == texts[:5]


# --- the router on real embeddings --------------------------------------------------------------


async def test_router_routes_held_out_queries_to_their_expert(
    embedder: Any, tmp_path: Path
) -> None:
    router = Router(embedder)
    names = await router.load_package(str(write_package(tmp_path)))
    assert sorted(names) == sorted(EXPERTS)
    assert router.descriptions()["code"] == "questions about code"
    for e in EXPERTS:
        for q in routing_samples.held_out(e, 5):
            decision = await router.route(f"A chat. {q}")
            assert decision is not None and decision.expert == e, q
            assert decision.method == "centroid"


class CountingEmbedder:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.texts = 0

    @property
    def dim(self) -> int:
        return int(self.inner.dim)

    def embed(self, texts: Any) -> Any:
        self.texts += len(texts)
        return self.inner.embed(texts)


async def test_adapter_published_adds_an_expert_and_redelivery_costs_nothing(
    embedder: Any, tmp_path: Path
) -> None:
    counting = CountingEmbedder(embedder)
    router = Router(counting)
    await router.load_package(str(write_package(tmp_path / "pkg", ("code", "cooking"))))
    query = f"A chat. {routing_samples.held_out('astronomy', 1)[0]}"
    before = await router.route(query)
    assert before is not None and before.expert != "astronomy"
    routing = tmp_path / "astro.jsonl"
    routing.write_text(
        "\n".join(json.dumps({"instruction": t}) for t in routing_samples.samples("astronomy", 30))
        + "\nnot json\n"
    )
    msg = AdapterPublished(
        expert="astronomy",
        version="v1",
        base_model="base",
        uri=str(tmp_path / "adapters" / "astronomy"),
        routing_uri=routing.as_uri(),  # file://
        description="stars and planets",
    )
    await router.on_adapter_published(msg)
    after = await router.route(query)
    assert after is not None and after.expert == "astronomy"
    assert router.descriptions()["astronomy"] == "stars and planets"
    embedded = counting.texts
    await router.on_adapter_published(msg)  # redelivered: same samples, nothing embedded
    assert counting.texts == embedded


def test_routing_jsonl_skips_bad_lines() -> None:
    data = b'{"instruction": "a"}\n\nnot json\n{"other": 1}\n{"instruction": " b "}\n'
    assert parse_routing_jsonl(data) == ["a", "b"]


async def test_reader_lists_a_local_package(tmp_path: Path) -> None:
    root = write_package(tmp_path, ("code",), n=3)
    (root / "adapters" / "bare").mkdir()
    (root / "adapters" / "bare" / "description.txt").write_text("no samples\n")
    got = {s.name: s for s in await Reader().package(str(root))}
    assert set(got) == {"code", "bare"}
    assert len(got["code"].samples) == 3 and got["bare"].samples == ()
    assert got["bare"].description == "no samples"


# --- agent routing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer,expected",
    [
        ('{"function": "astronomy"}', "astronomy"),
        ("function: Code\nparams: {}", "code"),
        ('I would pick "cooking".', "cooking"),
        ("cooking is right", "cooking"),
        ("code or cooking", None),
        ('{"function": "poetry"}', None),
        ("", None),
    ],
)
def test_parse_choice(answer: str, expected: str | None) -> None:
    assert parse_choice(answer, ["code", "cooking", "astronomy"]) == expected


async def test_agent_router_asks_the_function_expert_and_falls_back_on_failure() -> None:
    sent: list[dict[str, Any]] = []

    async def complete(body: dict[str, Any]) -> dict[str, Any]:
        sent.append(body)
        return {"choices": [{"message": {"content": '{"function": "cooking"}'}}]}

    experts = {"function": "picks tools", "cooking": "recipes", "code": "programs"}
    agent = AgentRouter(complete)
    assert await agent.choose("A chat. bake bread", experts) == "cooking"
    assert sent[0]["model"] == "function"
    assert "cooking:\n  description: recipes" in sent[0]["messages"][1]["content"]
    assert "Input: A chat. bake bread" in agent_prompt("A chat. bake bread", experts)

    async def broken(body: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("no backend")

    assert await AgentRouter(broken).choose("x", experts) is None
    # No function expert: nothing to ask.
    assert await AgentRouter(complete).choose("x", {"code": "programs"}) is None


# --- front-door pieces ------------------------------------------------------------------------


def test_rate_limiter_allows_the_rate_and_says_when_to_retry() -> None:
    limiter = ClientRateLimiter(60)  # one a second, a burst of 60
    assert all(limiter.check("k", now=0.0) is None for _ in range(60))
    wait = limiter.check("k", now=0.0)
    assert wait == pytest.approx(1.0)
    assert limiter.check("other", now=0.0) is None
    assert limiter.check("k", now=1.01) is None
    assert ClientRateLimiter(0).check("k") is None


@pytest.mark.parametrize(
    "status,body,message,type_",
    [
        (400, b'{"error": {"message": "bad", "type": "x", "code": 400}}', "bad", "x"),
        (
            422,
            b'{"error": "Input validation error", "error_type": "validation"}',
            "Input validation error",
            "validation",
        ),
        (
            422,
            b'{"detail": [{"msg": "field required"}]}',
            '[{"msg": "field required"}]',
            "invalid_request_error",
        ),
        (500, b"upstream exploded", "upstream exploded", "server_error"),
    ],
)
def test_backend_errors_become_openai_envelopes(
    status: int, body: bytes, message: str, type_: str
) -> None:
    err = normalise_error(status, body)["error"]
    assert err["message"] == message and err["type"] == type_
    assert set(err) == {"message", "type", "param", "code"}


def test_pod_order_prefers_holders_within_the_slack() -> None:
    pool = BackendPool(["http://a:1", "http://b:2/v1/"], affinity_slack=2)
    a, b = pool.backends
    assert (a.url, b.url) == ("http://a:1/v1", "http://b:2/v1")
    a.models, b.models = frozenset({"code"}), frozenset({"cooking"})
    assert pool.order("code")[0] is a and pool.order("cooking")[0] is b
    a.outstanding = 3  # beyond least (0) + slack (2): spill over to the idle pod
    assert pool.order("code")[0] is b
    a.outstanding = 2
    assert pool.order("code")[0] is a
    a.healthy = False
    assert pool.order("code") == [b]
    b.healthy = False  # nothing healthy: try everything rather than nothing
    assert len(pool.order("code")) == 2
    assert api_base("pod:8000") == "http://pod:8000/v1"


def test_requests_are_checked_with_clear_messages() -> None:
    service = RouterService(BackendPool([]))

    def problem(body: dict[str, Any], kind: Any = "chat") -> str:
        with pytest.raises(InvalidRequest) as exc:
            service.parse(kind, json.dumps(body).encode())
        assert exc.value.http_status == 400
        return exc.value.message

    assert "messages" in problem({"model": "auto", "messages": []})
    assert "model" in problem({"model": 3, "messages": [{"role": "user", "content": "x"}]})
    assert "system message may only come" in problem(
        {
            "model": "auto",
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "b"},
                {"role": "user", "content": "c"},
            ],
        }
    )
    assert "last message" in problem(
        {
            "model": "auto",
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        }
    )
    assert "role" in problem({"model": "auto", "messages": [{"role": "wizard", "content": "a"}]})
    assert "prompt" in problem({"model": "auto"}, "completions")
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        service.parse("chat", b"{nope")


async def _chunks(parts: list[bytes], fail: bool) -> AsyncIterator[bytes]:
    for p in parts:
        yield p
    if fail:
        raise aiohttp.ClientPayloadError("Response payload is not completed")


async def _events(parts: list[bytes], fail: bool = False) -> tuple[list[bytes], BackendPod]:
    backend = BackendPod("http://pod/v1", outstanding=1)
    released: list[bool] = []
    stream = Stream(
        backend,
        200,
        {"content-type": "text/event-stream"},
        _chunks(parts, fail),
        lambda: released.append(True),
    )
    got = [e async for e in stream.events()]
    assert released == [True]  # the connection went back exactly once
    return got, backend


async def test_streams_pass_whole_events_and_end_broken_ones_with_an_error_event() -> None:
    got, backend = await _events([b'data: {"a"', b": 1}\n\nda", b"ta: [DONE]\n\n"])
    assert got == [b'data: {"a": 1}\n\n', b"data: [DONE]\n\n"]
    assert backend.outstanding == 0
    got, _ = await _events([b"data: 1\r\n\r\n"])
    assert got == [b"data: 1\r\n\r\n"]
    # Torn in the middle of an event: the torn part is dropped, an error event says why.
    got, _ = await _events([b'data: 1\n\ndata: {"x'])
    assert got[0] == b"data: 1\n\n" and json.loads(got[1][len(b"data: ") :])["error"]["code"]
    # The connection breaks: whatever was whole went on, then the error event.
    got, backend = await _events([b"data: 1\n\n"], fail=True)
    error = json.loads(got[1][len(b"data: ") :])["error"]
    assert got[0] == b"data: 1\n\n" and "broke off" in error["message"]
    assert backend.outstanding == 0
