"""A GGUF file to a Hugging Face model folder (``airoboros models import-gguf``).

The weights come through transformers' GGUF loader (it dequantizes Q4_1 and the like), but
its tokenizer is wrong for GPT-2 style BPE models such as SmolLM2 (eos ``<|im_start|>``, a
bos prepended, spaces that do not round-trip). So the tokenizer is rebuilt here from the
GGUF's own vocabulary, merges and special-token ids, and verified before the folder is
declared done:

(a) every probe string's ids name the GGUF's token at that index, the special tokens
    encode to their single GGUF id, and ``decode(encode(s)) == s``;
(b) optionally, a greedy answer through the chat template contains an expected word
    ("Paris" for "What is the capital of France?").

Any failed check raises :class:`ImportCheckFailed` with a one-line message.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airoboros.errors import AiroborosError

PROBES = (
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces, and  double  spaces",
    "line one\nline two\n\nafter a blank line\n",
    "\ttabs\tand trailing space ",
    "numbers 12345 and 3.14159",
    "naïve café, Grüße, 日本語, emoji 🙂",
    "<|im_start|>user\nHi<|im_end|>\n",
)

ANSWER_QUESTION = "What is the capital of France?"
ANSWER_EXPECTED = "Paris"

DTYPES = ("float32", "bfloat16")

# token_type values of GGUF (llama.cpp's llama_token_type)
_CONTROL = 3
_USER_DEFINED = 4


class ImportCheckFailed(AiroborosError):
    """A converted model failed one of the import checks."""


@dataclass
class GGUFTokenizerMeta:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    model: str
    pre: str
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    chat_template: str | None
    context_length: int | None = None


@dataclass
class ImportReport:
    output: Path
    dtype: str
    checks: list[str] = field(default_factory=list)


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.contents()


def read_tokenizer_meta(gguf_path: str | Path) -> GGUFTokenizerMeta:
    from gguf import GGUFReader

    try:
        r = GGUFReader(str(gguf_path))
    except (ValueError, OSError, KeyError) as exc:
        raise ImportCheckFailed(f"{gguf_path} is not a readable GGUF file ({exc})") from exc
    model = _field(r, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ImportCheckFailed(
            f"tokenizer.ggml.model is {model!r}; only GPT-2 style BPE ('gpt2') is supported"
        )
    arch = _field(r, "general.architecture")
    tokens = list(_field(r, "tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ImportCheckFailed("the GGUF holds no tokenizer.ggml.tokens")
    return GGUFTokenizerMeta(
        tokens=tokens,
        token_types=list(_field(r, "tokenizer.ggml.token_type") or [1] * len(tokens)),
        merges=list(_field(r, "tokenizer.ggml.merges") or []),
        model=model,
        pre=_field(r, "tokenizer.ggml.pre") or "default",
        bos_id=_field(r, "tokenizer.ggml.bos_token_id"),
        eos_id=_field(r, "tokenizer.ggml.eos_token_id"),
        unk_id=_field(r, "tokenizer.ggml.unknown_token_id"),
        pad_id=_field(r, "tokenizer.ggml.padding_token_id"),
        add_bos=bool(_field(r, "tokenizer.ggml.add_bos_token")),
        chat_template=_field(r, "tokenizer.chat_template"),
        context_length=_field(r, f"{arch}.context_length") if arch else None,
    )


def build_tokenizer(meta: GGUFTokenizerMeta) -> Any:
    """A ``PreTrainedTokenizerFast`` from the GGUF's vocabulary and merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(meta.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.merges]
    unk = meta.tokens[meta.unk_id] if meta.unk_id is not None else None
    tk = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=False, byte_fallback=False)
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.pre in ("smollm", "starcoder", "refact"):
        # llama.cpp's smollm/starcoder pre-tokenizers split every digit on its own
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(meta.tokens, meta.token_types, strict=False)
        if ty in (_CONTROL, _USER_DEFINED)
    ]
    tk.add_special_tokens(special)

    def name(i: int | None) -> str | None:
        return meta.tokens[i] if i is not None and 0 <= i < len(meta.tokens) else None

    # add_bos_token: PreTrainedTokenizerFast has no BOS post-processor of its own; with
    # the flag set, a TemplateProcessing prepends it (set before the wrapper copies `tk`).
    if meta.add_bos and meta.bos_id is not None:
        bos = name(meta.bos_id)
        tk.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos} $A",
                    pair=f"{bos} $A {bos} $B",
                    special_tokens=[(bos, meta.bos_id)],
                ),
            ]
        )

    kwargs: dict[str, Any] = {
        "tokenizer_object": tk,
        "bos_token": name(meta.bos_id),
        "eos_token": name(meta.eos_id),
        "unk_token": name(meta.unk_id),
        "pad_token": name(meta.pad_id),
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    if meta.context_length:
        kwargs["model_max_length"] = int(meta.context_length)
    tok = PreTrainedTokenizerFast(**{k: v for k, v in kwargs.items() if v is not None})  # type: ignore[no-untyped-call]
    if meta.chat_template:
        tok.chat_template = meta.chat_template
    return tok


def _write_tokenizer_config_flags(folder: Path, meta: GGUFTokenizerMeta) -> None:
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["add_bos_token"] = meta.add_bos
    cfg["add_eos_token"] = False
    if meta.chat_template:
        cfg["chat_template"] = meta.chat_template
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def verify_tokenizer(tok: Any, meta: GGUFTokenizerMeta) -> list[str]:
    """Check (a): ids against the GGUF vocabulary, round trips, special tokens."""
    lines: list[str] = []
    if len(tok) != len(meta.tokens):
        raise ImportCheckFailed(
            f"tokenizer has {len(tok)} tokens, the GGUF vocabulary {len(meta.tokens)}"
        )
    for tid, want in ((meta.bos_id, "bos"), (meta.eos_id, "eos"), (meta.pad_id, "pad")):
        if tid is None:
            continue
        got = getattr(tok, f"{want}_token_id")
        if got != tid:
            raise ImportCheckFailed(f"{want} token id is {got}, the GGUF says {tid}")
    n_ids = 0
    for s in PROBES:
        ids = tok.encode(s, add_special_tokens=False)
        for i in ids:
            if tok.convert_ids_to_tokens(i) != meta.tokens[i]:
                raise ImportCheckFailed(
                    f"id {i} is {tok.convert_ids_to_tokens(i)!r} but the GGUF's token {i} "
                    f"is {meta.tokens[i]!r}"
                )
        back = tok.decode(ids, skip_special_tokens=False)
        if back != s:
            raise ImportCheckFailed(f"round trip failed: {s!r} came back as {back!r}")
        n_ids += len(ids)
    lines.append(
        f"ok: {len(PROBES)} probe strings ({n_ids} ids) match the GGUF vocabulary and round-trip"
    )
    for i, (t, ty) in enumerate(zip(meta.tokens, meta.token_types, strict=False)):
        if ty != _CONTROL:
            continue
        ids = tok.encode(t, add_special_tokens=False)
        if ids != [i]:
            raise ImportCheckFailed(f"special token {t!r} encodes to {ids}, the GGUF id is {i}")
    specials = [t for t, ty in zip(meta.tokens, meta.token_types, strict=False) if ty == _CONTROL]
    lines.append(f"ok: {len(specials)} special tokens encode to their single GGUF id")
    with_special = tok.encode("x", add_special_tokens=True)
    starts_bos = bool(with_special) and with_special[0] == meta.bos_id
    if starts_bos != meta.add_bos:
        raise ImportCheckFailed(
            f"add_bos_token is {meta.add_bos} in the GGUF but encode() "
            f"{'prepends' if starts_bos else 'does not prepend'} bos"
        )
    lines.append(
        f"ok: bos {'prepended' if meta.add_bos else 'not prepended'} (add_bos_token={meta.add_bos})"
    )
    return lines


def greedy_answer(
    folder: str | Path, question: str = ANSWER_QUESTION, max_new_tokens: int = 24
) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))  # type: ignore[no-untyped-call]
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()  # type: ignore[no-untyped-call]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    return str(tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))


def import_gguf(
    gguf_path: str | Path,
    output: str | Path,
    *,
    dtype: str = "float32",
    answer_check: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ImportReport:
    """Convert ``gguf_path`` into a Hugging Face folder at ``output`` and verify it.

    The folder is written under a temporary name next to ``output`` and renamed into place
    only after every check passed, so a half-written or failing folder never appears.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    say = progress or (lambda _m: None)
    gguf_path = Path(gguf_path)
    output = Path(output)
    if dtype not in DTYPES:
        raise ImportCheckFailed(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if not gguf_path.is_file():
        raise ImportCheckFailed(f"no GGUF file at {gguf_path}")
    report = ImportReport(output=output, dtype=dtype)

    say(f"reading the tokenizer of {gguf_path.name}")
    meta = read_tokenizer_meta(gguf_path)
    tok = build_tokenizer(meta)
    report.checks.extend(verify_tokenizer(tok, meta))
    for line in report.checks:
        say(line)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        say("dequantizing the weights (transformers' GGUF loader)")
        torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch_dtype
            )
        except (ValueError, OSError, KeyError, RuntimeError) as exc:
            raise ImportCheckFailed(
                f"transformers cannot load the weights of {gguf_path.name}: {exc}"
            ) from exc
        for attr, tid in (
            ("bos_token_id", meta.bos_id),
            ("eos_token_id", meta.eos_id),
            ("pad_token_id", meta.pad_id),
        ):
            setattr(model.config, attr, tid)
        model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
            bos_token_id=meta.bos_id, eos_token_id=meta.eos_id, pad_token_id=meta.pad_id
        )
        say(f"writing safetensors ({dtype})")
        model.save_pretrained(str(tmp), safe_serialization=True)
        del model
        tok.save_pretrained(str(tmp))
        _write_tokenizer_config_flags(tmp, meta)

        # reload what was written: the folder a user gets is what is checked
        from transformers import AutoTokenizer

        reloaded = AutoTokenizer.from_pretrained(str(tmp))  # type: ignore[no-untyped-call]
        verify_tokenizer(reloaded, meta)
        report.checks.append("ok: the written tokenizer reloads and passes the same checks")
        say(report.checks[-1])
        if answer_check:
            say(f"asking {ANSWER_QUESTION!r} (greedy, chat template)")
            answer = greedy_answer(tmp)
            if ANSWER_EXPECTED not in answer:
                raise ImportCheckFailed(
                    f"greedy answer to {ANSWER_QUESTION!r} lacks {ANSWER_EXPECTED!r}: {answer!r}"
                )
            report.checks.append(
                f"ok: greedy answer {answer.strip()!r} contains {ANSWER_EXPECTED!r}"
            )
            say(report.checks[-1])
        if output.exists():
            shutil.rmtree(output)
        tmp.chmod(0o755)  # mkdtemp makes it private; the folder is meant to be shared
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.rename(output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return report
