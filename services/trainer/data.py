"""Turning dataset rows into training tensors: prompt formatting, masking, packing, collation.

The prompt is the airoboros chat format the original's qlora fork trained on (reference
§4.6), and the one the router and inference build at serving time::

    <BOS>{system or "A chat."}\\nUSER: {instruction}\\nASSISTANT: {response}<EOS>

Loss is on the response and EOS only. Rows flagged ``skip_prompt_formatting`` use their
instruction verbatim as the prompt (it already holds its own format).

Packing puts several examples in one row of at most ``max_length`` tokens. Each example's
``position_ids`` restart at 0 and no attention mask is passed: transformers (>= 4.53, sdpa
and eager attention) then derives a block-diagonal causal mask from the position resets
(``masking_utils.find_packed_sequence_indices``), so no token attends across examples.
flash-attention 2 reads the same position ids as varlen boundaries. This holds only without
a KV cache (``use_cache=False``, as the trainer sets): with one, transformers ignores packing.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from airoboros.errors import ConfigError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value CrossEntropyLoss skips
DEFAULT_SYSTEM = "A chat."


class TrainingDataError(ConfigError):
    """The rows given to the trainer cannot be trained on (empty, malformed, all too long)."""

    code = "invalid_training_data"

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return f"invalid training data: {self.problems[0]}"
        return f"invalid training data ({len(self.problems)} problems): " + "; ".join(self.problems)


Example = dict[str, list[int]]  # {"input_ids": [...], "labels": [...]}, equal lengths


def build_prompt(row: Mapping[str, Any]) -> str:
    """The prompt text of ``row`` (everything before the response), without BOS."""
    instruction = str(row["instruction"])
    if row.get("skip_prompt_formatting"):
        return instruction
    system = row.get("system") or DEFAULT_SYSTEM
    return f"{system}\nUSER: {instruction}\nASSISTANT: "


def validate_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    """Raise ``TrainingDataError`` if ``rows`` is empty or a row lacks instruction/response.

    A field is missing when absent, not a string, or only whitespace. The message names the
    first few offending rows (0-based) and how many there are in all.
    """
    if not rows:
        raise TrainingDataError(["the dataset is empty: no rows to train on"])
    bad: dict[str, list[int]] = {"instruction": [], "response": []}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            bad["instruction"].append(i)
            continue
        for key, idx in bad.items():
            value = row.get(key)
            if not isinstance(value, str) or not value.strip():
                idx.append(i)
    problems = []
    for key, idx in bad.items():
        if idx:
            shown = ", ".join(str(i) for i in idx[:5]) + (", ..." if len(idx) > 5 else "")
            problems.append(
                f"{len(idx)} of {len(rows)} rows have no '{key}' (a non-empty string); rows {shown}"
            )
    if problems:
        raise TrainingDataError(problems)


def format_examples(
    rows: Sequence[Mapping[str, Any]], tokenizer: Any, max_length: int
) -> tuple[list[Example], int]:
    """Tokenize ``rows`` into examples; return them and how many were dropped as too long.

    Prompt and response are tokenized separately (as the original did), so the boundary
    between them is exact: ``labels`` is -100 on BOS and every prompt token and equals
    ``input_ids`` on the response tokens and the final EOS. Examples of more than
    ``max_length`` tokens are dropped, not truncated: a truncated answer teaches the model
    to stop mid-sentence. Rows must have been checked with ``validate_rows``.
    """
    prompts = [build_prompt(r) for r in rows]
    responses = [str(r["response"]) for r in rows]
    # One batched call each: the fast tokenizer parallelises over the batch in Rust.
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out: list[Example] = []
    dropped = 0
    for p_ids, r_ids in zip(prompt_ids, response_ids, strict=True):
        source = bos + list(p_ids)
        target = list(r_ids) + eos
        if len(source) + len(target) > max_length:
            dropped += 1
            continue
        labels = [IGNORE_INDEX] * len(source) + target
        # The first token is never a prediction target (nothing precedes it). Masking it
        # explicitly also keeps packing exact when a prompt is empty: otherwise the previous
        # example's last token would be trained to predict it.
        labels[0] = IGNORE_INDEX
        out.append({"input_ids": source + target, "labels": labels})
    return out, dropped


def format_example(row: Mapping[str, Any], tokenizer: Any, max_length: int) -> Example | None:
    """One row as ``{"input_ids", "labels"}`` (see ``format_examples``), or None if too long."""
    validate_rows([row])
    examples, _ = format_examples([row], tokenizer, max_length)
    return examples[0] if examples else None


def pack_examples(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group example indices into bins whose lengths sum to at most ``max_length``.

    Best-fit decreasing: longest first, each into the fullest bin it still fits, else a new
    bin. Near-optimal fill (bins are almost all full) in O(n log n + n·b) with b bins, and
    deterministic, so a resumed run packs exactly as the interrupted one did. Within a bin,
    indices are in placement order (longest first).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # Free space of each open bin, kept sorted, with the bin index as tie-breaker.
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length={max_length}")
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            space, b = free.pop(pos)
            bins[b].append(i)
            if space - n > 0:
                bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            if max_length - n > 0:
                bisect.insort(free, (max_length - n, len(bins) - 1))
    return bins


def pack(examples: Sequence[Example], max_length: int) -> list[dict[str, list[int]]]:
    """Concatenate examples into packed rows with ``position_ids`` restarting per example."""
    bins = pack_examples([len(e["input_ids"]) for e in examples], max_length)
    rows = []
    for b in bins:
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        for i in b:
            ex = examples[i]
            input_ids += ex["input_ids"]
            labels += ex["labels"]
            position_ids += range(len(ex["input_ids"]))
        rows.append(
            {
                "input_ids": input_ids,
                "labels": labels,
                "position_ids": position_ids,
                "num_examples": [len(b)],
            }
        )
    return rows


class ListDataset(torch.utils.data.Dataset[dict[str, list[int]]]):
    """A map-style dataset over a list of feature dicts."""

    def __init__(self, items: list[dict[str, list[int]]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


# Keys a collator adds for the trainer's own accounting; popped before the model sees them.
COUNT_KEYS = ("n_examples", "n_tokens")


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


@dataclass
class PackedCollator:
    """Stack packed rows, padding each to the batch's longest with one padding segment.

    The padding segment has its own positions (0, 1, ...), so the mask logic sees it as one
    more sequence: real tokens never attend to it, and its labels are -100. Output:
    ``input_ids``, ``labels``, ``position_ids``: LongTensor[batch, seq].
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, list[int]]]) -> dict[str, Any]:
        longest = _round_up(max(len(f["input_ids"]) for f in features), self.pad_to_multiple_of)
        ids, labels, pos = [], [], []
        n_tokens = 0
        for f in features:
            pad = longest - len(f["input_ids"])
            n_tokens += len(f["input_ids"])
            ids.append(f["input_ids"] + [self.pad_token_id] * pad)
            labels.append(f["labels"] + [IGNORE_INDEX] * pad)
            pos.append(f["position_ids"] + list(range(pad)))
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(pos, dtype=torch.long),
            "n_examples": sum(f["num_examples"][0] for f in features),
            "n_tokens": n_tokens,
        }


@dataclass
class PaddedCollator:
    """Right-pad single examples to the batch's longest, with an attention mask.

    Output: ``input_ids``, ``labels``, ``attention_mask``: LongTensor[batch, seq].
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, list[int]]]) -> dict[str, Any]:
        longest = _round_up(max(len(f["input_ids"]) for f in features), self.pad_to_multiple_of)
        ids, labels, mask = [], [], []
        n_tokens = 0
        for f in features:
            n = len(f["input_ids"])
            pad = longest - n
            n_tokens += n
            ids.append(f["input_ids"] + [self.pad_token_id] * pad)
            labels.append(f["labels"] + [IGNORE_INDEX] * pad)
            mask.append([1] * n + [0] * pad)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "n_examples": len(features),
            "n_tokens": n_tokens,
        }
