"""Dataset exports: the original airoboros JSONL converted to the formats trainers read.

Formats (``FORMATS``):

- ``airoboros``: the original JSONL, one ``Item.to_row()`` per line (alias ``jsonl``).
- ``sharegpt``: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}]}``,
  the shape axolotl (``type: sharegpt``) and LLaMA-Factory (``formatting: sharegpt``) read.
- ``alpaca``: ``{"instruction", "input", "output", "system"}``, LLaMA-Factory's alpaca shape.
- ``openai``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}``,
  OpenAI's chat fine-tuning JSONL.
- ``parquet``: columns instruction, response, category, system, skip_prompt_formatting.

Every format is written as a stream (parquet one row group at a time), so an export never
holds the dataset in memory. The rules (field mapping, how a ``skip_prompt_formatting``
transcript is split into turns) are documented in docs/exports.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, Protocol

from pydantic import ValidationError

from airoboros.contracts import Item
from airoboros.errors import AiroborosError

#: The export formats, canonical names.
FORMATS: tuple[str, ...] = ("airoboros", "sharegpt", "alpaca", "openai", "parquet")
#: Other names accepted for a format.
ALIASES: dict[str, str] = {"jsonl": "airoboros"}

_MEDIA_TYPES = {
    "airoboros": "application/jsonl",
    "sharegpt": "application/jsonl",
    "alpaca": "application/jsonl",
    "openai": "application/jsonl",
    "parquet": "application/vnd.apache.parquet",
}

RowLike = Item | Mapping[str, Any]


class ExportError(AiroborosError):
    """A row or an export request that cannot be exported; the message says why."""

    code = "export_error"


class UnknownFormat(ExportError):
    code = "unknown_format"

    def __init__(self, fmt: str) -> None:
        self.format = fmt
        super().__init__(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")


def resolve_format(fmt: str) -> str:
    """The canonical name of ``fmt`` (case-insensitive, aliases allowed); raises
    ``UnknownFormat`` naming the valid formats otherwise."""
    name = fmt.strip().lower()
    name = ALIASES.get(name, name)
    if name not in FORMATS:
        raise UnknownFormat(fmt)
    return name


def media_type(fmt: str) -> str:
    """The HTTP content type of an export in ``fmt``."""
    return _MEDIA_TYPES[resolve_format(fmt)]


def export_filename(stem: str, fmt: str) -> str:
    """A file name for an export: ``<stem>.jsonl`` for the original format,
    ``<stem>.<format>.jsonl`` for the other JSONL formats, ``<stem>.parquet``."""
    name = resolve_format(fmt)
    if name == "parquet":
        return f"{stem}.parquet"
    if name == "airoboros":
        return f"{stem}.jsonl"
    return f"{stem}.{name}.jsonl"


def coerce_row(row: RowLike) -> Item:
    """An ``Item`` from an Item or a row dict in the original format. Keys other than
    instruction, response, category, system and skip_prompt_formatting are ignored."""
    if isinstance(row, Item):
        return row
    if not isinstance(row, Mapping):
        raise ExportError(f"a row must be a JSON object, got {type(row).__name__}")
    data = {
        k: row[k]
        for k in ("instruction", "response", "category", "system", "skip_prompt_formatting")
        if k in row
    }
    data.setdefault("category", "")
    if data.get("skip_prompt_formatting") is None:
        data.pop("skip_prompt_formatting", None)
    try:
        return Item.model_validate(data)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ExportError("; ".join(problems)) from None


# --- conversations ------------------------------------------------------------------------

Role = Literal["human", "gpt"]


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str


@dataclass(frozen=True)
class Conversation:
    """A row as a chat: an optional system prompt, then turns that alternate human/gpt,
    starting with human and ending with gpt (the row's response)."""

    system: str | None
    turns: tuple[Turn, ...]


_RP_HEADER = re.compile(r"^This is a chat between \d+ characters?:\s*(.+?)\s*$")
_PAIR_HEADER = re.compile(r"^A chat between (.+)\.\s*$")
_END_OF_SETTING = "End of setting."
#: a line that opens a turn in the fallback (no recognised header): a short name, a colon
#: and text on the same line
_NAME_LINE = re.compile(r"^([^\W\d_][^:\n]{0,40}?):(?!//)[ \t]*\S")


def _speaker(line: str, names: Iterable[str]) -> str | None:
    """The name of ``names`` that opens ``line`` as ``Name: text``, if any."""
    best: str | None = None
    for name in names:
        opens = line.startswith(name + ":") and line[len(name) + 1 :].strip()
        if opens and (best is None or len(name) > len(best)):  # "Ann" vs "Ann Lee"
            best = name
    return best


def _participants(header: str, text: str) -> list[str] | None:
    """The names a transcript's first line announces, or None."""
    m = _RP_HEADER.match(header)
    if m:
        names = [n.strip() for n in m.group(1).split(",") if n.strip()]
        return names or None
    m = _PAIR_HEADER.match(header)
    if not m:
        return None
    # "A chat between X and Y.": a name may itself hold " and ", so prefer the split
    # whose two names both open lines of the transcript.
    pair = m.group(1)
    splits = [
        (pair[:i].strip(), pair[i + 5 :].strip())
        for i in (mm.start() for mm in re.finditer(" and ", pair))
    ]
    splits = [(a, b) for a, b in splits if a and b]
    if not splits:
        return None
    for a, b in splits:
        if re.search(rf"^{re.escape(a)}:", text, re.M) and re.search(
            rf"^{re.escape(b)}:", text, re.M
        ):
            return [a, b]
    return list(splits[0])


def split_transcript(instruction: str, response: str) -> Conversation | None:
    """Split a ``skip_prompt_formatting`` row (a whole transcript in ``instruction``)
    into a system preamble and alternating turns; None when no turn can be found.

    The rule (docs/exports.md has examples):

    1. Speakers. A first line ``This is a chat between N characters: A, B, C`` (rp) or
       ``A chat between X and Y.`` (gtkm, awareness) names them. Without such a line the
       speakers are the name opening the response, the name of the instruction's last
       ``Name: text`` line, and any name that opens two or more lines.
    2. Preamble. If a line reads ``End of setting.`` (rp), the preamble ends there (with
       an ``Actions should ...`` line right after it), and any unnamed text between it and
       the first named turn is the first human turn (rp's opening "Let's break the ice.").
       Otherwise the preamble is everything before the first ``Speaker: text`` line after
       the header, so a ``Name:`` line followed by a description is preamble.
    3. Turns. Each ``Speaker: text`` line opens a turn; other lines continue it. The
       speaker of the instruction's last turn who does not open the response is the human
       side; every other speaker is gpt. The response is the final gpt turn. Consecutive
       turns of one side are merged (joined by a blank line, as rp joins consecutive
       characters), and gpt turns before the first human turn join the system preamble.
       Turn values keep their ``Name:`` prefix, as in the original transcript.
    """
    text = instruction.replace("\r\n", "\n").strip()
    reply = response.strip()
    if not text:
        return None
    lines = text.split("\n")
    participants = _participants(lines[0].strip(), text)

    # Who opens the response (a gpt speaker; several when rp merged characters).
    reply_lines = reply.split("\n")
    gpt_names: set[str] = set()
    if participants:
        for line in reply_lines:
            name = _speaker(line, participants)
            if name:
                gpt_names.add(name)
    else:
        m = _NAME_LINE.match(reply_lines[0]) if reply_lines else None
        if m:
            gpt_names.add(m.group(1))

    # Where the dialogue may start.
    body_start = 1 if participants else 0
    explicit_end = False
    for i, line in enumerate(lines):
        if line.strip() == _END_OF_SETTING:
            body_start = i + 1
            if body_start < len(lines) and lines[body_start].startswith("Actions should"):
                body_start += 1
            explicit_end = True
            break

    if participants:
        speakers = set(participants)
    else:
        counts: dict[str, int] = {}
        last_other: str | None = None
        for line in lines[body_start:]:
            m = _NAME_LINE.match(line)
            if m:
                counts[m.group(1)] = counts.get(m.group(1), 0) + 1
                if m.group(1) not in gpt_names:
                    last_other = m.group(1)
        speakers = set(gpt_names) | {n for n, c in counts.items() if c >= 2}
        if last_other:
            speakers.add(last_other)
    if not speakers:
        return None

    # Segment the dialogue: (speaker or None for unnamed text, text).
    first = next((i for i in range(body_start, len(lines)) if _speaker(lines[i], speakers)), None)
    if first is None:
        if not explicit_end:
            return None
        first = len(lines)  # rp's first row: the opening line is the only human turn
    segments: list[tuple[str | None, list[str]]] = []
    gap = "\n".join(lines[body_start:first]).strip()
    preamble_end = first
    if explicit_end:
        preamble_end = body_start
        if gap:
            segments.append((None, [gap]))
    for line in lines[first:]:
        name = _speaker(line, speakers)
        if name:
            segments.append((name, [line]))
        else:
            segments[-1][1].append(line)

    human = next((n for n, _ in reversed(segments) if n is not None and n not in gpt_names), None)
    humans = {human} if human else set(speakers) - gpt_names
    if not humans:
        return None

    turns: list[Turn] = []
    for name, seg in segments:
        value = "\n".join(seg).strip()
        if not value:
            continue
        role: Role = "human" if name is None or name in humans else "gpt"
        turns.append(Turn(role, value))
    turns.append(Turn("gpt", reply))

    merged: list[Turn] = []
    for t in turns:
        if merged and merged[-1].role == t.role:
            merged[-1] = Turn(t.role, merged[-1].text + "\n\n" + t.text)
        else:
            merged.append(t)
    system_parts = ["\n".join(lines[:preamble_end]).strip()]
    while merged and merged[0].role == "gpt":
        system_parts.append(merged.pop(0).text)
    if len(merged) < 2:
        return None
    system = "\n".join(p for p in system_parts if p) or None
    return Conversation(system, tuple(merged))


def to_conversation(row: RowLike) -> Conversation:
    """The row as a chat. A plain row is one human turn (the instruction) and one gpt turn
    (the response), with its ``system`` if any; a ``skip_prompt_formatting`` row is split
    by ``split_transcript`` (falling back to the plain shape when no turn is found), its
    own ``system``, if any, coming before the transcript's preamble."""
    r = coerce_row(row).to_row()
    system: str | None = r.get("system") or None
    if r.get("skip_prompt_formatting"):
        conv = split_transcript(r["instruction"], r["response"])
        if conv is not None:
            parts = [p for p in (system, conv.system) if p]
            return Conversation("\n\n".join(parts) or None, conv.turns)
    return Conversation(system, (Turn("human", r["instruction"]), Turn("gpt", r["response"])))


_CONTEXTUAL = re.compile(
    r"\A\s*((?:BEGININPUT\b.*?\bENDINPUT\s*)+)BEGININSTRUCTION\b(.*?)\bENDINSTRUCTION\s*\Z",
    re.S,
)


def split_contextual(instruction: str) -> tuple[str, str] | None:
    """(input blocks, instruction) of a closed-context instruction: one or more
    ``BEGININPUT ... ENDINPUT`` blocks (kept verbatim, markers and BEGINCONTEXT metadata
    included) followed by ``BEGININSTRUCTION ... ENDINSTRUCTION`` (the text inside the
    markers); None when the instruction is not exactly that."""
    m = _CONTEXTUAL.match(instruction)
    if not m or not m.group(2).strip():
        return None
    return m.group(1).strip(), m.group(2).strip()


# --- row converters -----------------------------------------------------------------------


def to_sharegpt(row: RowLike) -> dict[str, Any]:
    conv = to_conversation(row)
    turns = [{"from": "system", "value": conv.system}] if conv.system else []
    turns += [{"from": t.role, "value": t.text} for t in conv.turns]
    return {"conversations": turns}


def to_openai(row: RowLike) -> dict[str, Any]:
    conv = to_conversation(row)
    roles = {"human": "user", "gpt": "assistant"}
    msgs = [{"role": "system", "content": conv.system}] if conv.system else []
    msgs += [{"role": roles[t.role], "content": t.text} for t in conv.turns]
    return {"messages": msgs}


def to_alpaca(row: RowLike) -> dict[str, Any]:
    """``system`` is always written ("" when the row has none) so that every line has the
    same keys: ``datasets`` fails on a large JSONL whose later lines add a key."""
    item = coerce_row(row)
    r = item.to_row()
    if r.get("skip_prompt_formatting"):
        conv = to_conversation(item)
        return {
            "instruction": "\n".join(t.text for t in conv.turns[:-1]),
            "input": "",
            "output": conv.turns[-1].text,
            "system": conv.system or "",
        }
    instruction, given = r["instruction"], ""
    ctx = split_contextual(instruction)
    if ctx is not None:
        given, instruction = ctx
    return {
        "instruction": instruction,
        "input": given,
        "output": r["response"],
        "system": r.get("system") or "",
    }


# --- encoders -----------------------------------------------------------------------------


class Encoder(Protocol):
    """Turns rows into bytes incrementally: ``feed`` each row, then ``finish`` once."""

    def feed(self, row: RowLike) -> bytes: ...

    def finish(self) -> bytes: ...


class _JsonlEncoder:
    def __init__(self, fmt: str) -> None:
        self.convert = {
            "airoboros": lambda r: coerce_row(r).to_row(),
            "sharegpt": to_sharegpt,
            "alpaca": to_alpaca,
            "openai": to_openai,
        }[fmt]

    def feed(self, row: RowLike) -> bytes:
        return (json.dumps(self.convert(row), ensure_ascii=False) + "\n").encode()

    def finish(self) -> bytes:
        return b""


class _Drain:
    """A write-only file for pyarrow that hands back what was written since last asked."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.pos = 0
        self.closed = False

    def write(self, data: Any) -> int:
        b = bytes(data)
        self.chunks.append(b)
        self.pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def take(self) -> bytes:
        out = b"".join(self.chunks)
        self.chunks.clear()
        return out


class _ParquetEncoder:
    #: rows per row group; also how often a streamed export yields bytes
    ROWS = 2048
    #: ... or sooner when the buffered text reaches this size
    BYTES = 16 * 1024 * 1024

    def __init__(self) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:  # pragma: no cover - pyarrow comes with airoboros[export]
            raise ExportError(
                "parquet export needs pyarrow: pip install 'airoboros[export]'"
            ) from None
        self.pa = pa
        self.schema = pa.schema(
            [
                pa.field("instruction", pa.string(), nullable=False),
                pa.field("response", pa.string(), nullable=False),
                pa.field("category", pa.string(), nullable=False),
                pa.field("system", pa.string()),
                pa.field("skip_prompt_formatting", pa.bool_(), nullable=False),
            ]
        )
        self.sink = _Drain()
        self.writer = pq.ParquetWriter(
            pa.PythonFile(self.sink, mode="w"), self.schema, compression="zstd"
        )
        self.cols: dict[str, list[Any]] = {f.name: [] for f in self.schema}
        self.size = 0

    def feed(self, row: RowLike) -> bytes:
        r = coerce_row(row).to_row()
        for key in ("instruction", "response", "category", "system"):
            self.cols[key].append(r.get(key))
        self.cols["skip_prompt_formatting"].append(bool(r.get("skip_prompt_formatting")))
        self.size += len(r["instruction"]) + len(r["response"]) + len(r.get("system") or "")
        if len(self.cols["instruction"]) >= self.ROWS or self.size >= self.BYTES:
            self._flush()
        return self.sink.take()

    def _flush(self) -> None:
        if self.cols["instruction"]:
            self.writer.write_table(self.pa.table(self.cols, schema=self.schema))
            self.cols = {k: [] for k in self.cols}
            self.size = 0

    def finish(self) -> bytes:
        self._flush()
        self.writer.close()
        return self.sink.take()


def encoder(fmt: str) -> Encoder:
    """A fresh encoder for ``fmt`` (any name ``resolve_format`` accepts)."""
    name = resolve_format(fmt)
    if name == "parquet":
        return _ParquetEncoder()
    return _JsonlEncoder(name)


def _located(exc: ExportError, n: int) -> ExportError:
    return ExportError(f"row {n}: {exc}")


def iter_export(rows: Iterable[RowLike], fmt: str) -> Iterator[bytes]:
    """The bytes of ``rows`` exported as ``fmt``, in chunks (empty chunks skipped)."""
    enc = encoder(fmt)
    for n, row in enumerate(rows, 1):
        try:
            chunk = enc.feed(row)
        except ExportError as exc:
            raise _located(exc, n) from None
        if chunk:
            yield chunk
    tail = enc.finish()
    if tail:
        yield tail


async def aiter_export(rows: AsyncIterable[RowLike], fmt: str) -> AsyncIterator[bytes]:
    """``iter_export`` over an async source of rows (the SQL store, in the topics API)."""
    enc = encoder(fmt)
    n = 0
    async for row in rows:
        n += 1
        try:
            chunk = enc.feed(row)
        except ExportError as exc:
            raise _located(exc, n) from None
        if chunk:
            yield chunk
    tail = enc.finish()
    if tail:
        yield tail


def export_rows(rows: Iterable[RowLike], fmt: str, dest: Path | str | IO[bytes]) -> int:
    """Write ``rows`` as ``fmt`` to ``dest`` and return how many rows were written.

    ``dest`` is a path (written to a temporary file beside it, then renamed into place,
    so a failed export leaves no partial file; parent folders are created) or a binary
    stream (written to, not closed). Raises ``UnknownFormat`` for an unknown format and
    ``ExportError`` (naming the row number) for a row that is not a valid dataset row.
    """
    fmt = resolve_format(fmt)
    count = 0

    def counted() -> Iterator[RowLike]:
        nonlocal count
        for row in rows:
            count += 1
            yield row

    if isinstance(dest, str | Path):
        path = Path(dest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("wb") as fh:
                for chunk in iter_export(counted(), fmt):
                    fh.write(chunk)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    else:
        for chunk in iter_export(counted(), fmt):
            dest.write(chunk)
        dest.flush()
    return count
