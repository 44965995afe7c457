"""The one protocol (airoboros.protocol) and the one error tree (airoboros.errors) with its
envelope (airoboros.web): the same request models on the router and the inference
service, the bounds they keep, the answers' shapes, and every app answering an outage
with a 503, Retry-After, in the envelope."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from airoboros import protocol
from airoboros.errors import (
    AdapterConflict,
    ApiError,
    BadGateway,
    ConfigError,
    ConnectError,
    DependencyUnavailable,
    InvalidRequest,
    NotFoundError,
    PayloadTooLarge,
    RateLimited,
    ServiceUnavailable,
    StoreUnavailable,
    Unauthorized,
    UnknownModel,
)
from airoboros.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceDelta,
    CompletionRequest,
    ModelCard,
    ModelList,
    stream_event,
)
from airoboros.web import error_envelope, error_response, route_error, unexpected_error

CHAT = {"model": "code", "messages": [{"role": "user", "content": "hi"}]}


# --- requests ------------------------------------------------------------------------------


def test_the_router_and_the_inference_service_parse_with_the_same_models() -> None:
    from airoboros.inference import service as inference
    from airoboros.router import service as router

    assert router.ChatCompletionRequest is inference.ChatCompletionRequest
    assert router.CompletionRequest is inference.CompletionRequest
    assert router.ChatMessage is inference.ChatMessage


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_completion_tokens", 0),
        ("n", 0),
        ("temperature", 2.5),
        ("top_p", 0),
        ("top_k", 2**40),
        ("presence_penalty", 3),
        ("stop", ["x"] * 17),
        ("stop", ["a", ""]),
        ("model", ""),
    ],
)
def test_bounds_hold_for_every_server(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate({**CHAT, field: value})
    assert err.value.errors()[0]["loc"][0] == field


def test_what_either_server_accepted_is_accepted() -> None:
    # The router's: no model (it chooses), the original server's `expert`, a null stream,
    # tool results, fields nobody names (passed on untouched).
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "ann"},
                {"role": "tool", "content": "42", "tool_call_id": "c1"},
            ],
            "expert": "code",
            "stream": None,
            "parallel_tool_calls": False,
        }
    )
    assert req.model is None and req.expert == "code" and not req.stream
    assert req.model_extra == {"parallel_tool_calls": False}
    # The inference service's: sampling fields, stop lists, usage in streams, every prompt.
    req = ChatCompletionRequest.model_validate(
        {**CHAT, "top_k": -1, "seed": 7, "stop": ["a", "b"], "stream_options": {"include_usage": 1}}
    )
    assert req.stop_list() == ("a", "b") and req.include_usage
    for prompt in ("x", ["x", "y"], [1, 2], [[1], [2, 3]]):
        assert CompletionRequest.model_validate({"model": "m", "prompt": prompt}).prompt == prompt
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({**CHAT, "messages": []})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": [{"role": "wizard", "content": "a"}]})


def test_lone_surrogates_are_found() -> None:
    raw = b'{"prompt": "\\ud800"}'
    assert protocol.has_lone_surrogate(raw, json.loads(raw))
    fine = '{"prompt": "\\u00e9 é"}'.encode()
    assert not protocol.has_lone_surrogate(fine, json.loads(fine))


# --- answers -------------------------------------------------------------------------------


def test_model_cards_carry_only_what_was_given() -> None:
    listed = ModelList(
        data=[
            ModelCard(id="auto", created=1, owned_by="airoboros-router"),
            ModelCard(id="base", created=1, owned_by="airoboros", parent=None, root="base"),
            ModelCard(id="qa", created=1, owned_by="airoboros", parent="base", description="q"),
        ]
    ).model_dump(mode="json")
    auto, base, qa = listed["data"]
    assert set(auto) == {"id", "object", "created", "owned_by"}
    assert base["parent"] is None and "description" not in base
    assert qa["parent"] == "base" and qa["description"] == "q"


def test_stream_events_have_usage_only_when_asked() -> None:
    chunk = ChatCompletionChunk(
        id="c", created=1, model="m", choices=[ChatChunkChoice(index=0, delta=ChoiceDelta())]
    )
    plain = json.loads(stream_event(chunk, False).removeprefix("data: "))
    assert "usage" not in plain and plain["choices"][0]["delta"] == {}
    asked = json.loads(stream_event(chunk, True).removeprefix("data: "))
    assert asked["usage"] is None and asked["object"] == "chat.completion.chunk"


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "status", "type_", "code"),
    [
        (InvalidRequest("x", param="n"), 400, "invalid_request_error", "invalid_request"),
        (Unauthorized("x"), 401, "invalid_request_error", "invalid_api_key"),
        (UnknownModel("x"), 404, "invalid_request_error", "model_not_found"),
        (AdapterConflict("x"), 409, "invalid_request_error", "adapter_exists"),
        (PayloadTooLarge("x"), 413, "invalid_request_error", "payload_too_large"),
        (RateLimited("x"), 429, "requests", "rate_limit_exceeded"),
        (BadGateway("x"), 502, "server_error", "backend_error"),
        (ServiceUnavailable("x"), 503, "server_error", "service_unavailable"),
        (ConfigError(["a: bad"]), 422, "invalid_request_error", "invalid_config"),
        (NotFoundError("x"), 404, "invalid_request_error", "not_found"),
        (StoreUnavailable("db down"), 503, "server_error", "store_unavailable"),
        (ConnectError("refused at 10.0.0.1:80"), 502, "server_error", "unreachable"),
        (ApiError("x", status=418, code="teapot"), 418, "invalid_request_error", "teapot"),
    ],
)
def test_every_error_of_the_tree_has_one_answer(
    exc: Any, status: int, type_: str, code: str
) -> None:
    resp = error_response(exc)
    body = json.loads(bytes(resp.body))
    assert resp.status_code == status
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    assert (body["error"]["type"], body["error"]["code"]) == (type_, code)
    if status == 503:
        assert resp.headers["retry-after"]
    # Retrying helps for 408/409/429/5xx, never for a taken adapter name.
    retry = status in (409, 429, 502, 503) and not isinstance(exc, AdapterConflict)
    assert resp.headers["x-should-retry"] == ("true" if retry else "false")


def test_the_envelope_says_what_a_caller_may_know() -> None:
    assert error_envelope(ConfigError(["a: bad", "b: worse"]))["error"]["problems"] == [
        "a: bad",
        "b: worse",
    ]
    # An LLM endpoint's failure names no address.
    message = error_envelope(ConnectError("refused at 10.0.0.1:80"))["error"]["message"]
    assert "10.0.0.1" not in message
    assert "try again" in error_envelope(DependencyUnavailable("broker"))["error"]["message"]
    assert route_error(405, "Method Not Allowed").code == "method_not_allowed"


def test_exceptions_outside_the_tree_are_an_outage_or_an_internal_error() -> None:
    down = unexpected_error(ConnectionRefusedError("db"), "internal")
    assert (down.http_status, down.code) == (503, "unavailable")
    bug = unexpected_error(KeyError("x"), "internal error (KeyError)")
    assert (bug.http_status, bug.code, bug.message) == (500, "internal_error", bug.message)


# --- the apps answer outages with a 503 in the envelope --------------------------------------


class _FailingPool:
    """A backend pool whose request fails with ``exc`` (``BackendPool``'s surface)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.backends: list[Any] = []

    def models(self) -> set[str]:
        return {"code"}

    async def post(self, path: str, body: bytes, model: str | None) -> Any:
        raise self.exc

    async def complete_json(self, body: dict[str, Any]) -> dict[str, Any]:
        raise self.exc


class _FlatEmbedder:
    dim = 4

    def embed(self, texts: list[str]) -> Any:
        return np.ones((len(texts), self.dim), dtype=np.float32) / 2


class _FailingEngine:
    """A generation backend whose submit fails with ``exc``."""

    model_id = "base"
    tokenizer = None

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def ready(self) -> bool:
        return True

    def adapters(self) -> list[Any]:
        return []

    def has_adapter(self, name: str) -> bool:
        return False

    async def submit(self, request: Any) -> Any:
        raise self.exc


OUTAGES = [StoreUnavailable("the database is down"), ConnectionRefusedError(111, "refused")]


async def _post(app: Any, path: str, body: dict[str, Any]) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
        return await c.post(path, json=body)


def _is_outage(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] and r.headers["x-should-retry"] == "true"
    assert set(r.json()) == {"error"} and r.json()["error"]["type"] == "server_error"


@pytest.mark.parametrize("exc", OUTAGES, ids=type)
async def test_the_router_answers_an_outage_with_503(exc: BaseException) -> None:
    from airoboros.router.app import create_app
    from airoboros.router.routing import Router
    from airoboros.router.settings import RouterSettings

    app = create_app(
        RouterSettings(bus=False), router=Router(_FlatEmbedder()), backends=_FailingPool(exc)
    )  # type: ignore[arg-type]
    _is_outage(await _post(app, "/v1/chat/completions", CHAT))


@pytest.mark.parametrize("exc", OUTAGES, ids=type)
async def test_the_inference_service_answers_an_outage_with_503(exc: BaseException) -> None:
    from airoboros.inference.app import create_app
    from airoboros.inference.settings import InferenceSettings

    app = create_app(InferenceSettings(), engine=_FailingEngine(exc))  # type: ignore[arg-type]
    _is_outage(await _post(app, "/v1/completions", {"model": "base", "prompt": "hi"}))
    # No model: the router chooses one, this server cannot.
    r = await _post(app, "/v1/completions", {"prompt": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
