"""Constrained decoding for ``response_format`` (json_schema, json_object) with xgrammar.

xgrammar was picked by measurement (bench/structured_libs_bench.py, figures and reasons
in docs/inference.md): against llguidance and lm-format-enforcer it had the steadiest
schema compile time (milliseconds on both a 512- and a 32k-token vocabulary), a per-token
mask cost on par with llguidance and ~90x below lm-format-enforcer's, and every
generation it let finish was schema-valid.

``parse_response_format`` checks a request's ``response_format`` (a 400 naming it when it
is wrong) and gives a ``FormatSpec``; ``Grammars`` compiles specs for one tokenizer, with
a bounded cache (requests of one job share a schema), and makes one ``Constraint`` per
sequence. Per decode step the engine asks every constrained row for its allowed-token
mask, applies all masks to the batch's logits in place (rows without a constraint keep
every token), and feeds each sampled token back (``Constraint.accept``). The grammar
allows EOS only where the JSON is complete, so a sequence ends on its own in valid JSON,
or is cut by max_tokens/stop as any other.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from airoboros.errors import ConfigError, InvalidRequest, Unsupported
from airoboros.parsing import check_shape

log = logging.getLogger(__name__)

#: the largest schema accepted, as JSON text (a posted schema is a stranger's data)
MAX_SCHEMA_CHARS = 64_000
#: compiled grammars kept per tokenizer
CACHE_SIZE = 64


@dataclass(frozen=True)
class FormatSpec:
    """What a request's output must be: ``schema`` (JSON text) or any JSON object."""

    kind: str  # "json_schema" | "json_object"
    schema: str | None = None


def parse_response_format(value: Any) -> FormatSpec | None:
    """The FormatSpec of an OpenAI ``response_format``; None for text (no constraint).
    InvalidRequest (400, param response_format) for anything malformed."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest("response_format must be an object", param="response_format")
    kind = value.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return FormatSpec("json_object")
    if kind != "json_schema":
        raise Unsupported(
            f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
            param="response_format",
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise InvalidRequest(
            'response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}',
            param="response_format.json_schema.schema",
        )
    try:
        check_shape(spec["schema"])
        text = json.dumps(spec["schema"], sort_keys=True)
    except (ConfigError, TypeError, ValueError) as exc:
        raise InvalidRequest(
            f"response_format schema is not usable: {exc}",
            param="response_format.json_schema.schema",
        ) from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise InvalidRequest(
            f"response_format schema is {len(text)} characters; at most {MAX_SCHEMA_CHARS}",
            param="response_format.json_schema.schema",
        )
    return FormatSpec("json_schema", text)


class Constraint:
    """One sequence's grammar state."""

    def __init__(self, matcher: Any) -> None:
        self._m = matcher

    def fill(self, bitmask: Any, row: int) -> None:
        """Write the tokens allowed next into row ``row`` of ``bitmask`` [B, ceil(V/32)]."""
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        return bool(self._m.accept_token(token))

    @property
    def finished(self) -> bool:
        return bool(self._m.is_terminated())


class Grammars:
    """Compiles FormatSpecs for one tokenizer and model vocabulary (thread-safe; compiled
    grammars are cached by schema text)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> None:
        import xgrammar as xgr

        self.vocab_size = vocab_size
        self._info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids or None
        )
        self._compiler = xgr.GrammarCompiler(self._info, cache_enabled=False)
        # xgrammar (0.2.8) lets raw control characters (below 0x20) into JSON strings,
        # which JSON forbids (they must be escaped). Compact JSON (no whitespace between
        # tokens: any_whitespace=False) needs none of them anywhere, so constrained rows
        # never get a token holding one: its bit is cleared in every row's mask.
        import torch

        words = (vocab_size + 31) // 32
        allowed = torch.ones(words * 32, dtype=torch.bool)
        specials = set(self._info.special_token_ids)
        for i, piece in enumerate(self._info.decoded_vocab):
            if i not in specials and any(b < 0x20 for b in piece):
                allowed[i] = False
        bits = allowed.view(words, 32).to(torch.int64) << torch.arange(32, dtype=torch.int64)
        packed = bits.sum(dim=1)
        #: int32 words, a 1 bit for each token allowed anywhere in compact JSON
        self._printable = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
        self._cache: OrderedDict[FormatSpec, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: FormatSpec) -> Any:
        """The compiled grammar of ``spec``; InvalidRequest when the schema cannot be
        compiled (an unsupported keyword, a bad reference)."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        try:
            if spec.kind == "json_object":
                compiled = self._compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False
                )
            else:
                assert spec.schema is not None
                compiled = self._compiler.compile_json_schema(spec.schema, any_whitespace=False)
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError on a bad schema
            raise InvalidRequest(
                f"response_format schema cannot be compiled: {str(exc)[:300]}",
                param="response_format.json_schema.schema",
            ) from None
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def constraint(self, compiled: Any) -> Constraint:
        import xgrammar as xgr

        return Constraint(xgr.GrammarMatcher(compiled))

    def restrict(self, bitmask: Any, row: int) -> None:
        """Clear, in row ``row`` of ``bitmask``, the tokens no compact JSON holds."""
        bitmask[row] &= self._printable

    def allocate(self, rows: int) -> Any:
        """A bitmask [rows, ceil(V/32)] int32 that allows every token."""
        import xgrammar as xgr

        return xgr.allocate_token_bitmask(rows, self.vocab_size)

    @staticmethod
    def apply(logits: Any, bitmask: Any, rows: list[int]) -> None:
        """Mask ``logits`` [B, V] in place: rows ``rows`` keep only their allowed tokens."""
        import xgrammar as xgr

        if bitmask.device != logits.device:
            bitmask = bitmask.to(logits.device, non_blocking=True)
        if logits.device.type == "cpu":
            xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
            return
        # On an accelerator xgrammar's own kernels need triton or a compiler at run time;
        # plain torch ops are the fallback when those are missing (not measured here: no
        # GPU in this project's test runs).
        try:
            xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
        except Exception:
            log.warning("xgrammar's mask kernel failed; using torch ops", exc_info=True)
            xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows, backend="torch_native")
