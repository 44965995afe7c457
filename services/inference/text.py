"""Turning generated tokens into streamed text: incremental detokenization and stop
sequences. Both backends share ``StopMatcher``; the local engine also ``IncrementalDecoder``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"  # what a decoder gives for an incomplete UTF-8 sequence


class IncrementalDecoder:
    """Decode a growing list of token ids into text deltas, never splitting a character.

    Decoding tokens one at a time is wrong twice over: byte-level BPE spreads one multi-byte
    character over several tokens (alone, each decodes to U+FFFD), and SentencePiece drops
    a token's leading space when it is decoded first. So each step decodes a short window
    (from ``prefix`` to the end) and emits what it adds beyond the window's old text, but
    only once that addition does not end in U+FFFD, i.e. once the character is complete.
    The concatenated deltas equal ``tokenizer.decode(ids)``, except that ``flush`` drops a
    final incomplete character (generation cut by ``max_tokens`` inside one) rather than
    show it as U+FFFD.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decoding window
        self.read = 0  # ids before this have been emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        old = self._decode(self.ids[self.prefix : self.read])
        new = self._decode(self.ids[self.prefix :])
        if len(new) > len(old) and not new.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return new[len(old) :]
        return ""

    def flush(self) -> str:
        old = self._decode(self.ids[self.prefix : self.read])
        new = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return new[len(old) :].rstrip(REPLACEMENT) if len(new) > len(old) else ""


class StopMatcher:
    """Cut streamed text before the first stop sequence.

    ``push`` returns the text that can be shown now and whether a stop was found. Text that
    might be the start of a stop sequence (the longest suffix that is a prefix of one) is
    held back until the next piece settles it, so a stop split across tokens is still cut
    and never half-shown.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        text = self.held + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return text[:cut], True
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:k]):
                    hold = k
                    break
        self.held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """What was held back, when the text ends without completing a stop."""
        out, self.held = self.held, ""
        return out
