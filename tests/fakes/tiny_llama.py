"""A tiny Llama built locally: random weights and a tokenizer trained on a few lines.

Nothing can be downloaded in tests, so every test that needs a causal LM (the trainer, the
router, the inference server) builds one here. ``build_tiny_llama(path)`` writes a directory
that ``AutoTokenizer.from_pretrained`` / ``AutoModelForCausalLM.from_pretrained`` load like
any Hugging Face checkpoint. It takes well under a second at the default size.

The tokenizer is byte-level BPE (any text round-trips, nothing maps to <unk>) with the
Llama special tokens ``<s>`` (BOS, added in front by the post-processor like Llama's own
tokenizer), ``</s>`` (EOS), ``<pad>`` and ``<unk>``. Weights are seeded, so two builds with
the same arguments are identical.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

# Enough text for a few hundred merges; the airoboros prompt words are in it so that
# prompts tokenize into a sensible number of tokens.
DEFAULT_TEXTS: tuple[str, ...] = (
    "A chat.\nUSER: What is the capital of France?\nASSISTANT: The capital of France is Paris.",
    "A chat.\nUSER: Write a haiku about the sea.\nASSISTANT: Waves fold into foam, salt wind carries gull voices, the tide keeps its time.",
    "You are a helpful assistant.\nUSER: Add 2 and 3.\nASSISTANT: 2 + 3 = 5.",
    "BEGININPUT\nBEGINCONTEXT\ndate: 2021-01-01\nENDCONTEXT\nThe river is long.\nENDINPUT\nBEGININSTRUCTION\nHow long is the river?\nENDINSTRUCTION",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.",
    "Question: If a train travels 60 miles in an hour, how far does it travel in three hours? Answer: 180 miles.",
    "Once upon a time there was a small robot who wanted to learn how to paint the stars at night.",
    "Tell me a joke. Why did the scarecrow win an award? Because he was outstanding in his field.",
    "Summarize the following text in one sentence, then list three keywords, numbers 0 1 2 3 4 5 6 7 8 9.",
)

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"


def build_tiny_tokenizer(
    path: Path | None = None,
    *,
    texts: Iterable[str] = DEFAULT_TEXTS,
    vocab_size: int = 512,
    model_max_length: int = 2048,
) -> object:
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    Saved to ``path`` when given. The returned tokenizer adds BOS in front of every
    encoded text (``add_special_tokens=True``), like Llama's. ``vocab_size`` is an upper
    bound: a small corpus yields fewer merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    if path is not None:
        fast.save_pretrained(str(path))
    return fast


def build_tiny_llama(
    path: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    vocab_size: int = 512,
    max_position: int = 2048,
    texts: Iterable[str] = DEFAULT_TEXTS,
    tokenizer: object | None = None,
    seed: int = 0,
    dtype: str = "float32",
    initializer_range: float = 0.02,
) -> Path:
    """Write a random-weight ``LlamaForCausalLM`` and its tokenizer to ``path``; return ``path``.

    ``kv_heads`` defaults to ``heads`` (no GQA) and ``intermediate`` to ``~2.7 * hidden``
    rounded to a multiple of 8, as Llama sizes its MLP. The model's vocabulary is the
    tokenizer's actual size (at most ``vocab_size``). Pass ``tokenizer`` (a
    ``PreTrainedTokenizerFast``) to reuse one trained elsewhere, e.g. on a benchmark's data.

    ``initializer_range`` is the std of the random weights. Llama's 0.02 gives a tiny model
    near-uniform logits that LoRA alone cannot sharpen much (the output head is frozen and
    sees a normalised hidden state of norm sqrt(hidden)); ~0.1 makes a model that a
    few dozen LoRA steps visibly teach.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = build_tiny_tokenizer(
            texts=texts, vocab_size=vocab_size, model_max_length=max_position
        )
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    tokenizer.save_pretrained(str(path))
    if intermediate is None:
        intermediate = max(8, (int(hidden * 8 / 3) + 7) // 8 * 8)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_position,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    # Seed a private generator state only: a test calling this must not have its own
    # global RNG stream shifted.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def make_lora_adapter(
    base: object,
    out: Path,
    seed: int,
    *,
    rank: int = 4,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
    safe: bool = True,
    description: str = "",
    use_dora: bool = False,
    lora_bias: bool = False,
    b_scale: float = 1.0,
) -> object:
    """A LoRA with random A and B (B non-zero, so it changes the output) on ``base`` (a
    model folder or a loaded model), saved to ``out`` in the LMoE layout (with
    ``description.txt`` when given). ``use_dora``: a DoRA adapter (a LoRA variant); ``lora_bias``: ``B`` with a bias; ``b_scale`` multiplies ``B`` (a small
    one keeps a real model's answers sensible).
    Returns the base model, unwrapped."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = base
    if isinstance(base, str | Path):
        model = AutoModelForCausalLM.from_pretrained(str(base))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(
            model,  # type: ignore[arg-type]
            LoraConfig(
                r=rank,
                lora_alpha=16,
                target_modules=list(target_modules),
                init_lora_weights=False,
                use_dora=use_dora,
                lora_bias=lora_bias,
            ),
        )
    if b_scale != 1.0:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(b_scale)
    peft_model.save_pretrained(str(out), safe_serialization=safe)
    if description:
        (out / "description.txt").write_text(description + "\n")
    return peft_model.unload()
