"""``prompt_format`` of the inference service (AIROBOROS_PROMPT_FORMAT) and
``--prompt-format`` of ``python -m airoboros.lmoe.api``: the prompt the service hands the
engine in each mode, for a tokenizer with a chat template (ChatML, as SmolLM2's) and one
without."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from airoboros.errors import InvalidRequest
from airoboros.inference.backend import GenerationRequest
from airoboros.inference.service import InferenceService
from airoboros.inference.settings import InferenceSettings
from airoboros.lmoe import api
from airoboros.protocol import ChatCompletionRequest
from tests.fakes.tiny_llama import build_tiny_tokenizer

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
]
AIROBOROS = "Be brief.\nUSER: What is the capital of France?\nASSISTANT: "
TEMPLATED = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


class Captured(Exception):
    def __init__(self, request: GenerationRequest) -> None:
        self.request = request


class CapturingBackend:
    """Just enough of a GenerationBackend: the tokenizer, and a submit that stops the
    request where the engine would take it."""

    model_id = "base"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def has_adapter(self, name: str) -> bool:
        return False

    async def submit(self, request: GenerationRequest) -> list[Any]:
        raise Captured(request)


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Any]:
    plain = build_tiny_tokenizer()
    templated = build_tiny_tokenizer()
    templated.chat_template = CHATML  # type: ignore[attr-defined]
    return {"plain": plain, "templated": templated}


async def engine_prompt(tokenizer: Any, prompt_format: str) -> GenerationRequest:
    settings = InferenceSettings(base_model="unused", prompt_format=prompt_format)
    service = InferenceService(CapturingBackend(tokenizer), settings)  # type: ignore[arg-type]
    req = ChatCompletionRequest(model="base", messages=MESSAGES, max_tokens=4)
    with pytest.raises(Captured) as got:
        await service.chat(req)
    return got.value.request


@pytest.mark.parametrize(
    ("tok", "mode", "prompt", "add_bos"),
    [
        ("templated", "airoboros", AIROBOROS, True),
        ("templated", "chat-template", TEMPLATED, False),
        ("templated", "template", TEMPLATED, False),  # the older spelling
        ("templated", "auto", TEMPLATED, False),
        ("plain", "auto", AIROBOROS, True),
        ("plain", "airoboros", AIROBOROS, True),
    ],
)
async def test_the_prompt_the_engine_gets(
    tokenizers: dict[str, Any], tok: str, mode: str, prompt: str, add_bos: bool
) -> None:
    request = await engine_prompt(tokenizers[tok], mode)
    assert request.prompt == prompt
    assert request.add_bos is add_bos


async def test_chat_template_without_a_template_is_refused(tokenizers: dict[str, Any]) -> None:
    settings = InferenceSettings(base_model="unused", prompt_format="chat-template")
    service = InferenceService(CapturingBackend(tokenizers["plain"]), settings)  # type: ignore[arg-type]
    req = ChatCompletionRequest(model="base", messages=MESSAGES, max_tokens=4)
    with pytest.raises(InvalidRequest, match="'chat-template' but the tokenizer has no chat"):
        await service.chat(req)


def test_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIROBOROS_PROMPT_FORMAT", "chat-template")
    assert InferenceSettings(base_model="m").prompt_format == "chat-template"
    monkeypatch.setenv("AIROBOROS_PROMPT_FORMAT", "chatml")
    with pytest.raises(ValidationError):
        InferenceSettings(base_model="m")


def test_lmoe_flag_defaults_to_the_format_the_experts_were_trained_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["--base-model", "b", "--lmoe", "l"]
    assert api.parse_args(base).prompt_format == "airoboros"
    assert api.parse_args([*base, "--prompt-format", "chat-template"]).prompt_format == (
        "chat-template"
    )
    with pytest.raises(SystemExit):
        api.parse_args([*base, "--prompt-format", "chatml"])
    assert "invalid choice: 'chatml'" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [[], ["--prompt-format", "chat-template"]])
def test_lmoe_flag_reaches_the_inference_settings(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, flag: list[str]
) -> None:
    import airoboros.inference.app
    import airoboros.router.app

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    (tmp_path / "lmoe" / "adapters").mkdir(parents=True)
    monkeypatch.setattr(airoboros.inference.app, "create_app", lambda settings: settings)
    monkeypatch.setattr(airoboros.router.app, "create_app", lambda settings: settings)
    args = api.parse_args(
        ["--base-model", str(tmp_path / "base"), "--lmoe", str(tmp_path / "lmoe"), *flag]
    )
    inference, _ = api.build(args, api.free_loopback_port())
    assert inference.prompt_format == (flag[1] if flag else "airoboros")
