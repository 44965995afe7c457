"""The inference service end to end on CPU: a tiny Llama, two random LoRA adapters in an
LMoE package, the FastAPI app under uvicorn on a loopback port, and the real OpenAI SDK."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from airoboros.contracts import AdapterPublished
from airoboros.inference.app import create_app
from airoboros.inference.backend import GenerationRequest, SamplingParams
from airoboros.inference.engine import LocalEngine
from airoboros.inference.prompt import PromptTurn, airoboros_prompt
from airoboros.inference.settings import InferenceSettings
from airoboros.inference.text import IncrementalDecoder, StopMatcher
from airoboros.objects import LocalObjectStore
from tests.fakes.asgi_server import AppServer
from tests.fakes.tiny_llama import build_tiny_llama, make_lora_adapter

BASE_ID = "tiny-base"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Add 2 and 3.",
    "Tell me a joke about a robot who paints the stars at night, please.",
]


# --- fixtures ---------------------------------------------------------------------------------


def make_adapter(
    base: Path, out: Path, seed: int, *, safe: bool = True, description: str = ""
) -> Path:
    """A LoRA with random A and B (B non-zero, so it changes the output)."""
    make_lora_adapter(base, out, seed, safe=safe, description=description)
    return out


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inference")
    base = build_tiny_llama(root / BASE_ID, initializer_range=0.1)
    lmoe = root / "lmoe"
    for name, seed in (("qa", 1), ("code", 2)):
        make_adapter(base, lmoe / "adapters" / name, seed, description=f"the {name} expert")
        (lmoe / "routing_data").mkdir(parents=True, exist_ok=True)
        (lmoe / "routing_data" / f"expert_{name}.jsonl").write_text(
            json.dumps({"instruction": f"a {name} question"}) + "\n"
        )
    extra = root / "extra"
    make_adapter(base, extra / "writer", 3, description="writes")
    make_adapter(base, extra / "pickled", 4, safe=False)
    outside = root / "outside"
    make_adapter(base, outside / "sneaky", 5)
    (extra / "escape").symlink_to(outside / "sneaky", target_is_directory=True)
    return {"root": root, "base": base, "lmoe": lmoe, "extra": extra, "outside": outside}


def settings_for(package: dict[str, Path], **overrides: Any) -> InferenceSettings:
    values: dict[str, Any] = {
        "base_model": str(package["base"]),
        "model_id": BASE_ID,
        "lmoe_paths": str(package["lmoe"]),
        "adapter_roots": str(package["extra"]),
        "cache_dir": str(package["root"] / "cache"),
        "device": "cpu",
        "max_body_bytes": 64 * 1024,
        "api_keys": "",
    }
    values.update(overrides)
    return InferenceSettings(**values)


@pytest.fixture(scope="module")
def server(package: dict[str, Path]) -> Iterator[AppServer]:
    store_root = package["root"] / "store"
    engine = LocalEngine(
        settings_for(package), object_store=lambda bucket: LocalObjectStore(store_root / bucket)
    )
    with AppServer(create_app(settings_for(package), engine=engine)) as srv:
        yield srv


def chat(client: openai.OpenAI, model: str, content: str, **kw: Any) -> Any:
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], **kw
    )


def engine_of(srv: AppServer) -> LocalEngine:
    backend = srv.app.state.backend
    assert isinstance(backend, LocalEngine)
    return backend


# --- text, prompt --------------------------------------------------------------------------


def test_prompt_matches_the_training_format() -> None:
    from airoboros.trainer.data import build_prompt

    one = [PromptTurn("user", "Add 2 and 3.")]
    assert airoboros_prompt(one) == build_prompt({"instruction": "Add 2 and 3."})
    with_system = [PromptTurn("system", "Be brief."), PromptTurn("user", "Hi")]
    assert airoboros_prompt(with_system) == build_prompt(
        {"instruction": "Hi", "system": "Be brief."}
    )
    turns = [
        PromptTurn("system", "S."),
        PromptTurn("user", "u1"),
        PromptTurn("assistant", "a1"),
        PromptTurn("user", "u2"),
    ]
    assert airoboros_prompt(turns) == "S.\nUSER: u1\nASSISTANT: a1\nUSER: u2\nASSISTANT: "


def test_chat_template_when_the_tokenizer_has_one(package: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    from airoboros.inference.prompt import render_chat

    tok = AutoTokenizer.from_pretrained(str(package["base"]))
    turns = [PromptTurn("user", "Hi")]
    assert render_chat(turns, tok) == ("A chat.\nUSER: Hi\nASSISTANT: ", True)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert render_chat(turns, tok) == ("<s><|user|>Hi<|assistant|>", False)
    assert render_chat(turns, tok, "airoboros")[0] == "A chat.\nUSER: Hi\nASSISTANT: "


def test_incremental_decoding_never_splits_a_character(package: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(package["base"]))
    text = "héllo wörld, 你好世界 🙂 naïve café"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) / 2  # byte-level BPE: multi-byte characters span tokens
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(t) for t in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_a_final_incomplete_character_is_dropped_not_shown_as_fffd(
    package: dict[str, Path],
) -> None:
    """Generation cut (max_tokens) inside a multi-byte character: the text ends before it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(package["base"]))
    ids = tok("naïve 你好", add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(t) for t in ids[:-1]]
    pieces.append(decoder.flush())
    assert "".join(pieces) == "naïve 你"


def test_stop_matcher_cuts_across_pieces() -> None:
    m = StopMatcher(["USER:", "###"])
    out = []
    for piece in ["Hello ", "wor", "ld US", "E", "R: more"]:
        text, stopped = m.push(piece)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "Hello world "
    assert stopped
    m = StopMatcher(["xyz"])
    assert m.push("abcx") == ("abc", False)
    assert m.push("q") == ("xq", False)
    assert m.flush() == ""


# --- the OpenAI API ------------------------------------------------------------------------------


def test_models_list_base_and_adapters(server: AppServer) -> None:
    models = {m.id: m for m in server.client().models.list().data}
    assert set(models) >= {BASE_ID, "qa", "code"}
    assert models["qa"].model_extra is not None
    assert models["qa"].model_extra["parent"] == BASE_ID
    assert models["qa"].model_extra["description"] == "the qa expert"
    assert models[BASE_ID].model_extra is not None
    assert models[BASE_ID].model_extra["parent"] is None


def test_chat_usage_and_length(server: AppServer, package: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(package["base"]))
    resp = chat(server.client(), "qa", "Add 2 and 3.", max_tokens=7)
    prompt = "A chat.\nUSER: Add 2 and 3.\nASSISTANT: "
    expected_prompt = 1 + len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert resp.object == "chat.completion"
    assert resp.model == "qa"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == expected_prompt
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    if choice.finish_reason == "length":
        assert resp.usage.completion_tokens == 7
    assert resp.usage.total_tokens == expected_prompt + resp.usage.completion_tokens


def test_adapters_change_the_output(server: AppServer) -> None:
    client = server.client()
    outs = {
        m: chat(client, m, PROMPTS[0], max_tokens=12).choices[0].message.content
        for m in ("qa", "code", BASE_ID)
    }
    assert len(set(outs.values())) == 3, outs


def test_greedy_matches_transformers_generate_and_eos_stops(package: dict[str, Path]) -> None:
    """Greedy decoding through the scheduler's KV cache gives transformers' own tokens; a
    sampled EOS ends the choice with finish_reason "stop", not counted as text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(package["base"]))
    model = AutoModelForCausalLM.from_pretrained(str(package["base"]))
    prompt = airoboros_prompt([PromptTurn("user", PROMPTS[1])])
    ids = [tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tok.pad_token_id,
        )
    greedy = out[0, len(ids) :].tolist()
    assert len(greedy) == 10
    k = next(i for i in range(2, 10) if greedy[i] not in greedy[:i])
    model.generation_config.eos_token_id = greedy[k]  # make the k-th greedy token the EOS
    settings = settings_for(package, lmoe_paths="")
    engine = LocalEngine(settings, model=model, tokenizer=tok)
    with AppServer(create_app(settings, engine=engine)) as srv:
        client = srv.client()
        stopped = chat(client, BASE_ID, PROMPTS[1], max_tokens=10)
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].message.content == tok.decode(
            greedy[:k], skip_special_tokens=True
        )
        assert stopped.usage is not None
        assert stopped.usage.completion_tokens == k + 1
        short = chat(client, BASE_ID, PROMPTS[1], max_tokens=k)
        assert short.choices[0].finish_reason == "length"
        assert short.choices[0].message.content == tok.decode(greedy[:k], skip_special_tokens=True)


def test_stream_equals_non_stream_and_reports_usage(server: AppServer) -> None:
    client = server.client()
    whole = chat(client, "code", PROMPTS[2], max_tokens=10)
    stream = chat(
        client,
        "code",
        PROMPTS[2],
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens  # type: ignore[union-attr]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_streamed_and_not(server: AppServer) -> None:
    client = server.client()
    whole = client.completions.create(
        model="qa", prompt="The quick brown", max_tokens=9, temperature=0
    )
    assert whole.object == "text_completion"
    assert whole.usage is not None and whole.usage.completion_tokens >= 1
    parts = client.completions.create(
        model="qa",
        prompt="The quick brown",
        max_tokens=9,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(parts)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    echoed = client.completions.create(
        model="qa", prompt="The quick brown", max_tokens=9, temperature=0, echo=True
    )
    assert echoed.choices[0].text == "The quick brown" + whole.choices[0].text


def test_n_choices_seeded_and_reproducible(server: AppServer) -> None:
    client = server.client()
    kw: dict[str, Any] = {"max_tokens": 10, "temperature": 1.0, "top_p": 0.95, "seed": 7, "n": 3}
    first = chat(client, "qa", PROMPTS[3], **kw)
    again = chat(client, "qa", PROMPTS[3], **kw)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # each choice samples with its own generator
    assert first.usage is not None
    assert first.usage.completion_tokens == sum(
        c.usage.completion_tokens  # type: ignore[union-attr]
        for c in [chat(client, "qa", PROMPTS[3], **{**kw, "n": 1, "seed": 7 + i}) for i in range(3)]
    )
    streamed = chat(client, "qa", PROMPTS[3], stream=True, **kw)
    got = ["", "", ""]
    for c in streamed:
        for ch in c.choices:
            got[ch.index] += ch.delta.content or ""
    assert got == texts


def test_stop_sequences_cut_the_text(server: AppServer) -> None:
    client = server.client()
    full = chat(client, BASE_ID, PROMPTS[0], max_tokens=16).choices[0].message.content
    assert full and len(full) > 6
    stop = full[3:6]
    cut = full[: full.find(stop)]
    for stops in (stop, ["zzzz-never", stop]):
        resp = chat(client, BASE_ID, PROMPTS[0], max_tokens=16, stop=stops)
        assert resp.choices[0].message.content == cut
        assert resp.choices[0].finish_reason == "stop"
        streamed = chat(client, BASE_ID, PROMPTS[0], max_tokens=16, stop=stops, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut


def test_errors_use_the_openai_envelope(server: AppServer) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError) as nf:
        chat(client, "no-such-expert", "hi")
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long:
        chat(client, "qa", "hello " * 2100)
    assert "maximum context length" in str(long.value)
    assert long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        chat(client, "qa", "hello", max_tokens=5000)
    bad_roles = [
        [{"role": "assistant", "content": "hi"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "system", "content": "only"}],
        [],
    ]
    for messages in bad_roles:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="qa", messages=messages)  # type: ignore[arg-type]
    for params in (
        {"max_tokens": -1},
        {"max_tokens": 0},
        {"n": 0},
        {"temperature": -0.5},
        {"top_p": 0},
    ):
        with pytest.raises(openai.BadRequestError) as err:
            chat(client, "qa", "hi", **params)
        assert err.value.param == next(iter(params))
    with pytest.raises(openai.BadRequestError, match="at most"):
        chat(client, "qa", "hi", n=99)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    big = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=b'{"model": "qa", "messages": [' + b" " * 70_000 + b"]}",
        headers={"content-type": "application/json"},
    )
    assert big.status_code == 413
    assert big.json()["error"]["code"] == "payload_too_large"
    junk = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json")
    assert junk.status_code == 400
    assert set(junk.json()["error"]) == {"message", "type", "param", "code"}


async def test_concurrent_streams_across_adapters_match_solo_runs(server: AppServer) -> None:
    """18 streams over two adapters and the base, greedy and seeded sampling, staggered so
    that requests join a running batch: each gives exactly what it gives alone."""
    client = server.aclient()
    models = ["qa", "code", BASE_ID]
    cases: list[dict[str, Any]] = []
    for i in range(18):
        sampled = i % 2 == 1
        case: dict[str, Any] = {
            "model": models[i % 3],
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": 6 + (i * 7) % 15,
            "temperature": 0.9 if sampled else 0,
        }
        if sampled:
            case.update(seed=1000 + i, top_p=0.9, extra_body={"top_k": 40})
        cases.append(case)

    async def run(case: dict[str, Any], delay: float = 0.0) -> tuple[str, str | None, int]:
        await asyncio.sleep(delay)
        stream = await client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **case
        )
        text, finish, used = "", None, -1
        async for c in stream:
            if c.choices:
                text += c.choices[0].delta.content or ""
                finish = c.choices[0].finish_reason or finish
            if c.usage is not None:
                used = c.usage.completion_tokens
        return text, finish, used

    alone = [await run(c) for c in cases]
    engine = engine_of(server)
    engine.stats["max_batch"] = engine.stats["max_adapters"] = 0
    together = await asyncio.gather(*(run(c, delay=0.01 * (i % 6)) for i, c in enumerate(cases)))
    assert list(together) == alone
    assert all(f in ("stop", "length") for _, f, _ in alone)
    assert engine.stats["max_batch"] >= 6
    assert engine.stats["max_adapters"] == 3  # qa, code and the base in one forward pass
    await client.close()


def test_a_client_that_leaves_frees_its_rows(server: AppServer) -> None:
    engine = engine_of(server)
    body = {
        "model": "qa",
        "messages": [{"role": "user", "content": PROMPTS[0]}],
        "max_tokens": 1500,
        "temperature": 0,
    }

    def idle_within(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if engine._batch is None and not engine._waiting:
                return True
            time.sleep(0.05)
        return False

    url = f"{server.url}/v1/chat/completions"
    steps = engine.stats["steps"]
    with httpx.stream("POST", url, json={**body, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    assert idle_within(5)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, timeout=0.3)
    assert idle_within(5)
    assert engine.stats["steps"] - steps < 1500


def test_a_failed_step_fails_its_requests_not_the_server(
    server: AppServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_of(server)
    client = server.client()
    before = chat(client, "qa", PROMPTS[2]).choices[0].message.content

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine, "_forward", broken)
    with pytest.raises(openai.InternalServerError, match="out of memory"):
        chat(client, "qa", PROMPTS[2])
    stream = chat(client, "code", PROMPTS[2], stream=True)
    with pytest.raises(openai.APIError, match="out of memory"):
        list(stream)
    monkeypatch.undo()
    assert chat(client, "qa", PROMPTS[2]).choices[0].message.content == before
    assert all(a.pins == 0 for a in engine._resident)


# --- adapters at run time ------------------------------------------------------------------------------


def test_load_and_unload_adapters_at_run_time(server: AppServer, package: dict[str, Path]) -> None:
    client = server.client()
    url = f"{server.url}/v1/adapters"
    r = httpx.post(url, json={"name": "writer", "path": str(package["extra"] / "writer")})
    assert r.status_code == 200, r.text
    assert r.json()["description"] == "writes"
    assert "writer" in {m.id for m in client.models.list().data}
    first = chat(client, "writer", PROMPTS[0]).choices[0].message.content
    again = httpx.post(url, json={"name": "writer", "path": str(package["extra"] / "writer")})
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "adapter_exists"
    # The same weights under another name, from a file:// URI: the same output.
    uri = (package["extra"] / "writer").as_uri()
    assert httpx.post(url, json={"name": "writer.v2", "uri": uri}).status_code == 200
    assert chat(client, "writer.v2", PROMPTS[0]).choices[0].message.content == first
    # Replacing keeps the name and swaps the weights.
    r = httpx.post(
        url,
        json={"name": "writer", "path": str(package["lmoe"] / "adapters" / "qa"), "replace": True},
    )
    assert r.status_code == 200
    assert chat(client, "writer", PROMPTS[0]).choices[0].message.content == (
        chat(client, "qa", PROMPTS[0]).choices[0].message.content
    )
    for name in ("writer", "writer.v2"):
        assert httpx.delete(f"{url}/{name}").status_code == 200
    assert "writer" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        chat(client, "writer", PROMPTS[0])
    assert httpx.delete(f"{url}/writer").status_code == 404


def test_adapter_from_the_object_store(server: AppServer, package: dict[str, Path]) -> None:
    store = LocalObjectStore(package["root"] / "store" / "airoboros")
    folder = package["extra"] / "writer"
    for name in ("adapter_config.json", "adapter_model.safetensors", "description.txt"):
        asyncio.run(store.put_bytes(f"pkg/adapters/writer/{name}", (folder / name).read_bytes()))
    url = f"{server.url}/v1/adapters"
    r = httpx.post(url, json={"name": "from-s3", "uri": "s3://airoboros/pkg/adapters/writer"})
    assert r.status_code == 200, r.text
    assert chat(server.client(), "from-s3", "hi").choices[0].message.content is not None
    other = httpx.post(url, json={"name": "x", "uri": "s3://other-bucket/pkg/adapters/writer"})
    assert other.status_code == 400 and "bucket" in other.json()["error"]["message"]
    dots = httpx.post(url, json={"name": "x", "uri": "s3://airoboros/pkg/../adapters/writer"})
    assert dots.status_code == 400
    assert httpx.delete(f"{url}/from-s3").status_code == 200


def test_bad_adapters_are_refused(server: AppServer, package: dict[str, Path]) -> None:
    url = f"{server.url}/v1/adapters"
    extra = package["extra"]
    cases = {
        "name traversal": {"name": "../evil", "path": str(extra / "writer")},
        "name slash": {"name": "a/b", "path": str(extra / "writer")},
        "name too long": {"name": "x" * 65, "path": str(extra / "writer")},
        "reserved": {"name": BASE_ID, "path": str(extra / "writer")},
        "outside the roots": {"name": "sneaky", "path": str(package["outside"] / "sneaky")},
        "dot-dot out of a root": {"name": "sneaky", "path": f"{extra}/../outside/sneaky"},
        "symlink out of a root": {"name": "sneaky", "path": str(extra / "escape")},
        "pickled weights": {"name": "pickled", "path": str(extra / "pickled")},
        "missing": {"name": "ghost", "path": str(extra / "ghost")},
        "unknown scheme": {"name": "web", "uri": "http://example.com/adapter"},
        "both": {"name": "w", "path": str(extra / "writer"), "uri": "file:///x"},
        "neither": {"name": "w"},
    }
    for why, body in cases.items():
        r = httpx.post(url, json=body)
        assert r.status_code == 400, (why, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error", why
    pickled = httpx.post(url, json=cases["pickled weights"]).json()["error"]["message"]
    assert "safetensors" in pickled
    assert (
        "outside the adapter roots"
        in httpx.post(url, json=cases["outside the roots"]).json()["error"]["message"]
    )
    assert httpx.delete(f"{url}/..").status_code in (400, 404)
    assert httpx.delete(f"{url}/bad%2Fname").status_code in (400, 404)
    names = {m.id for m in server.client().models.list().data}
    assert not names & {"sneaky", "pickled", "ghost", "../evil"}


def test_lru_eviction_with_one_resident_adapter(package: dict[str, Path]) -> None:
    settings = settings_for(package, max_resident_adapters=1)
    with AppServer(create_app(settings)) as srv:
        client = srv.client()
        engine = engine_of(srv)

        def resident() -> set[str]:
            listing = httpx.get(f"{srv.url}/v1/adapters").json()["data"]
            return {a["id"] for a in listing if a["resident"]}

        assert len(resident()) == 1
        qa_first = chat(client, "qa", PROMPTS[0]).choices[0].message.content
        assert resident() == {"qa"}
        code = chat(client, "code", PROMPTS[0]).choices[0].message.content
        assert resident() == {"code"}
        assert chat(client, "qa", PROMPTS[0]).choices[0].message.content == qa_first  # reloaded
        assert resident() == {"qa"}
        assert engine.stats["evictions"] >= 2

        async def both() -> list[str | None]:
            aclient = srv.aclient()
            calls = [
                aclient.chat.completions.create(
                    model=m,
                    messages=[{"role": "user", "content": PROMPTS[0]}],
                    max_tokens=8,
                    temperature=0,
                )
                for m in ("code", "qa", "code", BASE_ID, "qa")
            ]
            out = await asyncio.gather(*calls)
            await aclient.close()
            return [r.choices[0].message.content for r in out]

        # Only one adapter fits: the scheduler runs them in turns, and every answer is the
        # one the adapter gives alone.
        base = chat(client, BASE_ID, PROMPTS[0]).choices[0].message.content
        assert asyncio.run(both()) == [code, qa_first, code, base, qa_first]


async def test_adapter_published_hook(package: dict[str, Path]) -> None:
    settings = settings_for(package, lmoe_paths="")
    engine = LocalEngine(settings)
    await engine.start()
    try:
        msg = AdapterPublished(
            expert="writer",
            version="1",
            base_model=str(package["base"]),
            uri=(package["extra"] / "writer").as_uri(),
            routing_uri="file:///unused",
            description="announced",
        )
        await engine.on_adapter_published(msg)
        await engine.on_adapter_published(msg)  # redelivered: no change
        assert [a.name for a in engine.adapters()] == ["writer"]
        assert engine.adapters()[0].description == "writes"  # description.txt wins
        bad = msg.model_copy(update={"expert": "pickled", "uri": str(package["extra"] / "pickled")})
        await engine.on_adapter_published(bad)  # refused, logged, not raised
        assert [a.name for a in engine.adapters()] == ["writer"]
        (gen,) = await engine.submit(
            GenerationRequest(
                adapter="writer",
                prompt="hello",
                max_tokens=5,
                sampling=SamplingParams(temperature=0),
            )
        )
        chunks = [c async for c in gen]
        assert chunks[-1].finish_reason in ("stop", "length")
        assert gen.completion_tokens == chunks[-1].completion_tokens
    finally:
        await engine.close()


# --- the stacked mixed-adapter forward -------------------------------------------------------


def _peft_with(package: dict[str, Path], names: list[str]) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(package["base"])).eval()
    folders = {"qa": package["lmoe"] / "adapters" / "qa"}
    folders["code"] = package["lmoe"] / "adapters" / "code"
    folders["writer"] = package["extra"] / "writer"
    peft = PeftModel.from_pretrained(model, str(folders[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(str(folders[name]), adapter_name=name)
    return model, peft.eval()


def test_stacked_lora_gives_peft_mixed_batch_logits(package: dict[str, Path]) -> None:
    """Each row of a batch gets its own adapter (or none) exactly as peft's adapter_names
    path and as peft with that one adapter active; deleting an adapter restacks."""
    from airoboros.inference.lora import MixedLoRA, unsupported

    model, peft = _peft_with(package, ["qa", "code", "writer"])
    rows = ["qa", "code", "__base__", "writer", "qa"]
    ids = torch.randint(3, 200, (len(rows), 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = peft(input_ids=ids, adapter_names=rows).logits
        alone = []
        for i, name in enumerate(rows):
            if name == "__base__":
                with peft.disable_adapter():
                    alone.append(peft(input_ids=ids[i : i + 1]).logits)
            else:
                peft.set_adapter(name)
                alone.append(peft(input_ids=ids[i : i + 1]).logits)
        assert unsupported(peft) is None
        mixed = MixedLoRA()
        mixed.rebuild(peft)
        assert mixed.width == 3 * 4  # three rank-4 adapters side by side
        with mixed.rows(rows):
            got = model(input_ids=ids).logits
        base_only = model(input_ids=ids).logits  # outside rows(): no adapter at all
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, torch.cat(alone), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[0], base_only[0], atol=1e-3)  # qa does change row 0
    torch.testing.assert_close(got[2], base_only[2], rtol=1e-5, atol=1e-5)
    # Deleting "code" restacks: its rows now get no adapter, the others keep theirs.
    peft.delete_adapter("code")
    mixed.rebuild(peft)
    assert set(mixed.columns) == {"qa", "writer"}
    with torch.inference_mode(), mixed.rows(rows):
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after[1], base_only[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after[3], got[3], rtol=1e-4, atol=1e-4)


async def _serve_all(engine: LocalEngine, cases: list[tuple[str | None, str]]) -> list[str]:
    await engine.start()
    try:

        async def one(adapter: str | None, prompt: str) -> str:
            (gen,) = await engine.submit(
                GenerationRequest(
                    adapter=adapter,
                    prompt=airoboros_prompt([PromptTurn("user", prompt)]),
                    add_bos=True,
                    max_tokens=8,
                    sampling=SamplingParams(temperature=0),
                )
            )
            return "".join([c.text async for c in gen])

        return list(await asyncio.gather(*(one(a, p) for a, p in cases)))
    finally:
        await engine.close()


async def test_engine_stacked_and_peft_paths_agree_and_lora_bias_falls_back(
    package: dict[str, Path], tmp_path: Path
) -> None:
    """The engine's default stacked path and its peft path give the same greedy text for a
    mixed batch; an adapter with a LoRA bias, which stacking does not express, switches
    the engine to peft's path, and it is still applied."""
    cases: list[tuple[str | None, str]] = [
        (name, prompt) for name in ("qa", "code", None) for prompt in PROMPTS
    ]
    stacked = LocalEngine(settings_for(package))
    assert stacked._mixed is not None
    texts = await _serve_all(stacked, cases)
    assert stacked._mixed is not None and stacked._mixed.width == 8
    peft_path = LocalEngine(settings_for(package, mixed_lora="peft"))
    assert await _serve_all(peft_path, cases) == texts
    assert texts[0] != texts[8]  # qa and the base differ on the same prompt

    biased = tmp_path / "lmoe" / "adapters" / "biased"
    make_lora_adapter(package["base"], biased, 9, lora_bias=True)
    (tmp_path / "lmoe" / "routing_data").mkdir(parents=True)
    engine = LocalEngine(settings_for(package, lmoe_paths=f"{package['lmoe']},{tmp_path / 'lmoe'}"))
    got = await _serve_all(engine, [*cases, ("biased", PROMPTS[0])])
    assert engine._mixed is None  # fell back for good
    assert got[: len(cases)] == texts
    assert got[-1] != texts[8]  # the biased adapter is applied, not ignored


def test_a_dora_adapter_is_refused_with_the_reason(
    server: AppServer, package: dict[str, Path]
) -> None:
    """Neither path can put a DoRA adapter in a batch with others: loading one is a 400
    that says so, and the server keeps serving the rest."""
    folder = package["extra"] / "dora"
    make_lora_adapter(package["base"], folder, 11, use_dora=True)
    r = httpx.post(f"{server.url}/v1/adapters", json={"name": "dora", "path": str(folder)})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "DoRA" in message and "dora" in message
    names = {m.id for m in server.client().models.list().data}
    assert "dora" not in names and {"qa", "code"} <= names
    assert chat(server.client(), "qa", PROMPTS[0]).choices[0].message.content
