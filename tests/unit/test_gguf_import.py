"""`airoboros models import-gguf` on a tiny GGUF written here with the `gguf` package's
GGUFWriter: a 2-layer llama with random weights and a byte-level BPE vocabulary trained on a
few lines (special tokens <|endoftext|>, <|im_start|>, <|im_end|> like SmolLM2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("gguf")

from airoboros.cli.main import main
from airoboros.trainer.gguf import (
    PROBES,
    ImportCheckFailed,
    build_tokenizer,
    import_gguf,
    read_tokenizer_meta,
    verify_tokenizer,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXTS = [
    "What is the capital of France? The capital of France is Paris.",
    "the quick brown fox jumps over the lazy dog, the end.",
    "Hello, world! Hello there, line one\nline two\n\nnumbers 12345",
] * 4

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 64


def _vocab() -> tuple[list[str], list[str]]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(TEXTS, trainer=trainer)
    model = json.loads(tk.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return [t for t, _ in vocab], merges


def write_tiny_gguf(
    path: Path,
    *,
    tokenizer_model: str = "gpt2",
    add_bos: bool = False,
    tokens_override: list[str] | None = None,
) -> Path:
    import gguf

    tokens, merges = _vocab()
    if tokens_override is not None:
        tokens = tokens_override
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(n_vocab)
    w.add_file_type(0)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    types = [3 if t in SPECIALS else 1 for t in tokens]
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)
    rng = np.random.default_rng(0)

    def t(*shape: int) -> Any:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    head_dim = HIDDEN // HEADS
    w.add_tensor("token_embd.weight", t(n_vocab, HIDDEN))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    w.add_tensor("output.weight", t(n_vocab, HIDDEN))
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", t(HIDDEN, HIDDEN))
        w.add_tensor(f"blk.{i}.attn_k.weight", t(KV_HEADS * head_dim, HIDDEN))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(KV_HEADS * head_dim, HIDDEN))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(HIDDEN, HIDDEN))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(FFN, HIDDEN))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(FFN, HIDDEN))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(HIDDEN, FFN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def converted(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "tiny-hf"
    import_gguf(tiny_gguf, out, answer_check=False)
    return out


def test_folder_has_weights_config_and_tokenizer(converted: Path) -> None:
    names = {p.name for p in converted.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["hidden_size"] == HIDDEN and cfg["num_hidden_layers"] == LAYERS
    assert cfg["num_key_value_heads"] == KV_HEADS
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    gen = json.loads((converted / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (2, 2)
    tcfg = json.loads((converted / "tokenizer_config.json").read_text())
    assert tcfg["add_bos_token"] is False
    assert tcfg["chat_template"] == TEMPLATE
    # no half-written temporary folder is left beside it
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]


def test_tokenizer_matches_the_gguf_vocabulary(converted: Path, tiny_gguf: Path) -> None:
    from transformers import AutoTokenizer

    tokens, _ = _vocab()
    tok = AutoTokenizer.from_pretrained(str(converted))
    assert len(tok) == len(tokens)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.bos_token == "<|im_start|>" and tok.pad_token_id == 2
    for s in PROBES:
        ids = tok.encode(s)
        assert ids[0] != 1 or s.startswith("<|im_start|>")  # no bos prepended
        assert tok.convert_ids_to_tokens(ids) == [tokens[i] for i in ids]
        assert tok.decode(ids) == s
    # the merges are used: a word of the training text is one token, digits split singly
    assert tok.convert_ids_to_tokens(tok.encode(" capital")) == ["Ġcapital"]
    assert tok.convert_ids_to_tokens(tok.encode("123")) == ["1", "2", "3"]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[-1] == 2
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_weights_load_and_match_the_gguf(converted: Path, tiny_gguf: Path) -> None:
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(converted))
    reader = gguf.GGUFReader(str(tiny_gguf))
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    want = torch.from_numpy(np.array(emb.data)).reshape(model.get_input_embeddings().weight.shape)
    assert torch.equal(model.get_input_embeddings().weight.detach(), want)
    assert model.dtype == torch.float32
    out = model(torch.tensor([[1, 5, 6]])).logits
    assert out.shape == (1, 3, len(_vocab()[0]))


def test_bfloat16_and_add_bos(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = write_tiny_gguf(tmp_path / "bos.gguf", add_bos=True)
    out = tmp_path / "bos-hf"
    report = import_gguf(src, out, dtype="bfloat16", answer_check=False)
    assert any("bos prepended" in c for c in report.checks)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.encode("hi")[0] == 1 and tok.encode("hi", add_special_tokens=False)[0] != 1
    model = AutoModelForCausalLM.from_pretrained(str(out), torch_dtype="auto")
    assert model.dtype == torch.bfloat16


def test_a_vocabulary_mismatch_is_caught(tiny_gguf: Path) -> None:
    meta = read_tokenizer_meta(tiny_gguf)
    tok = build_tokenizer(meta)
    # the ids of "Ġthe" and "Ġcapital" swapped in what the GGUF claims
    i, j = meta.tokens.index("Ġthe"), meta.tokens.index("Ġcapital")
    meta.tokens[i], meta.tokens[j] = meta.tokens[j], meta.tokens[i]
    with pytest.raises(ImportCheckFailed, match="but the GGUF's token"):
        verify_tokenizer(tok, meta)


def test_cli_prints_checks_and_fails_in_one_line(
    tiny_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli-hf"
    argv = ["models", "import-gguf", str(tiny_gguf), "--output", str(out), "--no-answer-check"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "probe strings" in captured.err and "special tokens" in captured.err
    assert f"wrote {out}" in captured.out
    assert (out / "model.safetensors").is_file()

    bad = write_tiny_gguf(tmp_path / "spm.gguf", tokenizer_model="llama")
    assert main(["models", "import-gguf", str(bad), "--output", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("airoboros: import-gguf: tokenizer.ggml.model is 'llama'")
    assert not (tmp_path / "x").exists()


def test_a_file_that_is_not_gguf_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    assert main(["models", "import-gguf", str(junk), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # progress lines, then the failure in one line
    assert [e for e in err if not e.startswith("[")] == [err[-1]]
    assert err[-1].startswith("airoboros: import-gguf: ") and "not a readable GGUF file" in err[-1]
    assert not (tmp_path / "out").exists()
