"""Constrained decoding in our inference service: with a tiny random-weight Llama, every
request with response_format json_schema or json_object answers schema-valid JSON, alone,
streamed, and batched together with unconstrained requests; through the router too."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from airoboros.inference.app import create_app
from airoboros.inference.engine import LocalEngine
from airoboros.inference.settings import InferenceSettings
from tests.fakes.asgi_server import AppServer
from tests.fakes.tiny_llama import build_tiny_llama

BASE_ID = "tiny-base"

# Bounded schemas (maxLength, maxItems, enums): a random model writes random strings, and a
# bounded grammar ends within max_tokens whatever the model prefers.
SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "tasks": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"instruction": {"type": "string", "maxLength": 12}},
                    "required": ["instruction"],
                    "additionalProperties": False,
                },
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["tasks"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "question": {"type": "string", "maxLength": 10},
            "answer": {"type": "string", "maxLength": 10},
            "level": {"enum": ["easy", "hard"]},
            "score": {"type": "integer", "minimum": 0, "maximum": 9},
            "ok": {"type": "boolean"},
        },
        "required": ["question", "answer", "level", "score", "ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
            "tags": {
                "type": "array",
                "items": {"enum": ["red", "green", "blue"]},
                "maxItems": 4,
            },
        },
        "required": ["name", "tags"],
        "additionalProperties": False,
    },
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    root = tmp_path_factory.mktemp("structured")
    base = build_tiny_llama(root / BASE_ID)
    settings = InferenceSettings(
        base_model=str(base),
        model_id=BASE_ID,
        cache_dir=str(root / "cache"),
        device="cpu",
        api_keys="",
        max_batch_size=16,
    )
    with AppServer(create_app(settings, engine=LocalEngine(settings))) as srv:
        yield srv


def fmt(i: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Request ``i``'s response_format and the schema its answer must satisfy."""
    if i % 4 == 3:
        return {"type": "json_object"}, {"type": "object"}
    schema = SCHEMAS[i % len(SCHEMAS)]
    return {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}, schema


async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None, dict[str, Any] | None]:
    """Request ``i``: constrained (3 of 4) or not; streamed (every third) or not."""
    kw: dict[str, Any] = {
        "model": BASE_ID,
        "messages": [{"role": "user", "content": f"Give item number {i} as JSON."}],
        "max_tokens": 400,
        "temperature": 1.0,
        "seed": i,
    }
    schema = None
    if i % 5 != 4:
        kw["response_format"], schema = fmt(i)
    if i % 3 == 0:
        text, finish = "", None
        stream = await client.chat.completions.create(**kw, stream=True)
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish, schema
    r = await client.chat.completions.create(**kw)
    return r.choices[0].message.content or "", r.choices[0].finish_reason, schema


def check(results: list[tuple[str, str | None, dict[str, Any] | None]]) -> tuple[int, int]:
    """(constrained answers that are whole and valid, json_object answers cut at
    max_tokens). Bounded schemas always end on their own; an unbounded json_object of a
    random model may run into max_tokens (as with any server), its text then a prefix."""
    valid = cut = 0
    for text, finish, schema in results:
        if schema is None:
            continue
        if finish == "length" and schema == {"type": "object"}:
            cut += 1
            continue
        valid += 1
        assert finish == "stop", (finish, text)
        try:
            value = json.loads(text)
        except ValueError:
            raise AssertionError(f"not JSON: {text!r}") from None
        jsonschema.validate(value, schema)
    return valid, cut


def test_fifty_seeded_requests_answer_schema_valid_json(server: AppServer) -> None:
    async def run() -> list[tuple[str, str | None, dict[str, Any] | None]]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(50)))
        finally:
            await client.close()

    results = asyncio.run(run())
    valid, cut = check(results)
    assert valid + cut == 40
    # Every json_schema answer (30) is whole and valid; of the 10 json_object ones, a
    # random model's wander into max_tokens about half the time (5 with these seeds).
    assert cut <= 7, f"{cut} of 10 json_object answers ran into max_tokens"
    engine = server.app.state.backend
    assert engine.stats["max_batch"] > 1  # constrained and free rows shared decode steps
    free = [text for text, _, schema in results if schema is None]
    assert len(free) == 10
    # Unconstrained rows of a random model write anything, not JSON.
    assert sum(1 for t in free if _is_json(t)) < len(free)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_seeded_constrained_output_is_the_same_alone_and_batched(server: AppServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    alone = one_sync(client, 7)

    async def batched() -> list[Any]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        try:
            return await asyncio.gather(*(one(aclient, i) for i in (4, 7, 9, 14)))
        finally:
            await aclient.close()

    assert asyncio.run(batched())[1][0] == alone


def one_sync(client: openai.OpenAI, i: int) -> str:
    rf, _ = fmt(i)
    r = client.chat.completions.create(
        model=BASE_ID,
        messages=[{"role": "user", "content": f"Give item number {i} as JSON."}],
        max_tokens=400,
        temperature=1.0,
        seed=i,
        response_format=rf,  # type: ignore[arg-type]
    )
    return r.choices[0].message.content or ""


@pytest.mark.parametrize(
    "response_format, param",
    [
        ({"type": "json_schema"}, "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}, None),
        ({"type": "xml"}, "response_format"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}},
            "response_format.json_schema.schema",
        ),
    ],
)
def test_a_bad_response_format_is_a_clear_400(
    server: AppServer, response_format: dict[str, Any], param: str | None
) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=BASE_ID,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            response_format=response_format,  # type: ignore[arg-type]
        )
    assert "response_format" in str(info.value)
    body: Any = info.value.body
    if param is not None and isinstance(body, dict):
        assert body.get("param") == param


def test_through_the_router_with_the_openai_sdk(
    server: AppServer, embedder: Any, tmp_path: Path
) -> None:
    from tests.integration.test_router import KEY, serve_router

    with serve_router(embedder, backends=[server.url], default_expert=BASE_ID) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        rf, schema = fmt(1)
        rng = random.Random(5)
        for stream in (False, True):
            kw: dict[str, Any] = {
                "model": BASE_ID,
                "messages": [{"role": "user", "content": "a question as JSON"}],
                "max_tokens": 400,
                "seed": rng.randint(0, 1000),
                "response_format": rf,
            }
            if stream:
                text = "".join(
                    (c.choices[0].delta.content or "") if c.choices else ""
                    for c in client.chat.completions.create(**kw, stream=True)
                )
            else:
                text = client.chat.completions.create(**kw).choices[0].message.content or ""
            jsonschema.validate(json.loads(text), schema)


def test_response_format_on_text_completions_is_refused(server: AppServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            model=BASE_ID,
            prompt="hi",
            max_tokens=3,
            extra_body={"response_format": {"type": "json_object"}},
        )
    assert "chat/completions" in str(info.value)
    # Without it, the same request is fine.
    assert client.completions.create(model=BASE_ID, prompt="hi", max_tokens=3).choices
