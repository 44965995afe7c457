"""Culling: drop near-duplicates and poor rows from finished datasets with an LLM judge.

The engine of ``airoboros cull-instructions`` (airoboros.topics.cull.files) and of the
topics API's cull step (airoboros.topics.cull.worker):

1. Rows are grouped by category (the legacy ``reasoning_or_math`` is read as ``orca``).
   Categories whose rows are transcripts, multi-part or derived from other rows
   (``PASS_THROUGH``) are written unchanged.
2. Every other row is embedded as ``instruction + "\\n" + response`` and clustered
   greedily in input order: a row not yet in a cluster leads one, and takes every later
   unclustered row of its category at least as similar as the category's threshold
   (``min_docsearch_score`` as a cosine), at most ``cull_max_k`` rows in all. Coding rows
   with and without the `` PLAINFORMAT`` suffix never share a cluster.
3. The judge (judge.txt, beside this module) answers GOOD or BAD for every member of every cluster,
   singletons included. A cluster keeps its longest good member (instruction + response)
   and is dropped when no member is good. A judge call that fails after the client's
   retries counts as good, and is counted; auth and unknown-model errors stop the run,
   since they would otherwise keep everything unjudged.
4. Output is in input order (a cluster sits where its first row was); each row is written
   as it was read, so extra keys survive, except that a legacy category is renamed.

Progress is durable (a ``Ledger``): the plan (the clusters) is stored once, verdicts as
they arrive, and decisions in order, so a run killed at any moment resumes without
re-judging decided clusters, and without losing or repeating output rows.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from airoboros.config import DEFAULT_API_PARAMS, Config
from airoboros.embeddings import l2_threshold_to_cosine
from airoboros.errors import AiroborosError, AuthError, ConfigError, LLMError, ModelNotFoundError
from airoboros.templates import render

if TYPE_CHECKING:
    from airoboros.llm import LLMClient
    from airoboros.ports import Embedder

log = logging.getLogger(__name__)

#: Categories written through unchanged: those the original passed through (long or
#: multi-part rows a pairwise judge handles badly), plus transcripts (gtkm, awareness's
#: character rows) and rows derived from others (editor), which are judged with their source.
PASS_THROUGH = frozenset(
    {
        "stylized_response",
        "rp",
        "detailed_writing",
        "contextual",
        "counterfactual_contextual",
        "plan",
        "song",
        "wordgame",
        "gtkm",
        "awareness",
        "editor",
    }
)
#: Category names of older versions, read as their current name.
LEGACY_CATEGORIES = {"reasoning_or_math": "orca"}
PLAINFORMAT = "PLAINFORMAT"
#: The instructor name the judge's usage is counted under.
INSTRUCTOR = "cull"
DEFAULT_PROMPT = "judge.txt"
#: The original's prompt name: a config naming it without having the file gets ours.
ORIGINAL_PROMPT = "filter.txt"
FORMAT_VERSION = 1
DEFAULT_THRESHOLD = 100


class CullInputError(AiroborosError):
    """An input file is missing or holds a line that is not a dataset row."""

    code = "invalid_input"


class CullStateError(AiroborosError):
    """The progress kept beside the output belongs to other inputs or settings."""

    code = "cull_state_mismatch"


# --- rows -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CullRow:
    """What the engine needs of one row; ``where`` names it in messages (file:line)."""

    instruction: str
    response: str
    category: str
    system: str | None = None
    where: str = ""

    @property
    def text(self) -> str:
        return self.instruction + "\n" + self.response

    @property
    def plain(self) -> bool:
        return self.category == "coding" and self.instruction.rstrip().endswith(PLAINFORMAT)

    @property
    def size(self) -> int:
        return len(self.instruction) + len(self.response)


@dataclass
class SourceLine:
    """One input line: the row, its parsed object and its exact text."""

    row: CullRow
    data: dict[str, Any]
    raw: str

    def output_line(self) -> str:
        """The line to write: as read, unless the category was renamed."""
        if self.data.get("category") == self.row.category:
            return self.raw
        return json.dumps({**self.data, "category": self.row.category}, ensure_ascii=False)


def _string(data: dict[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        what = "missing" if value is None else f"a {type(value).__name__}, not a string"
        raise CullInputError(f"{where}: {key!r} is {what}")
    return value


def parse_line(text: str, where: str) -> SourceLine:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CullInputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, dict):
        raise CullInputError(f"{where}: expected a JSON object, got {type(data).__name__}")
    category = _string(data, "category", where)
    assert category is not None
    # Pass-through rows are never read by the judge: require of them only a category.
    judged = LEGACY_CATEGORIES.get(category, category) not in PASS_THROUGH
    row = CullRow(
        instruction=_string(data, "instruction", where, required=judged) or "",
        response=_string(data, "response", where, required=judged) or "",
        category=LEGACY_CATEGORIES.get(category, category),
        system=_string(data, "system", where, required=False),
        where=where,
    )
    return SourceLine(row, data, text)


def read_jsonl(paths: Sequence[str | Path]) -> list[SourceLine]:
    """Every row of the files, in order. Blank lines are skipped; anything else that is
    not a row raises CullInputError naming file:line."""
    out: list[SourceLine] = []
    for p in map(Path, paths):
        if not p.exists():
            raise CullInputError(f"{p}: no such file")
        if not p.is_file():
            raise CullInputError(f"{p}: not a file")
        with p.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{p}:{lineno}"
                try:
                    text = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as exc:
                    raise CullInputError(
                        f"{where}: not UTF-8 (byte {exc.start + 1} of the line)"
                    ) from None
                if text.strip():
                    out.append(parse_line(text, where))
    return out


# --- the plan: which rows are judged together --------------------------------------------


@dataclass
class Unit:
    """One decision of the output, in output order: a row written through (``members``
    of one, ``judged`` False), or a cluster of rows of which at most one is kept."""

    category: str
    members: list[int]
    judged: bool = True


@dataclass
class CullPlan:
    units: list[Unit]
    #: what the plan was made from (inputs and settings); a resume must match it
    fingerprint: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "units": [[u.category, u.members, u.judged] for u in self.units],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CullPlan:
        return cls(
            [Unit(c, [int(i) for i in m], bool(j)) for c, m, j in data["units"]],
            str(data.get("fingerprint", "")),
        )

    @property
    def clusters(self) -> list[Unit]:
        return [u for u in self.units if u.judged]


def greedy_clusters(vectors: np.ndarray, threshold: float, max_k: int) -> list[list[int]]:
    """Clusters of row positions: in order, each row not yet taken leads a cluster of
    itself and every later untaken row with cosine >= ``threshold`` to it (the most
    similar ``max_k - 1`` of them). ``vectors`` is [n, dim], unit-normalised."""
    n = len(vectors)
    taken = np.zeros(n, dtype=bool)
    clusters: list[list[int]] = []
    # Similarities a block of leaders at a time: [block, n] float32, at most ~64 MiB.
    block = max(1, min(512, (16 << 20) // max(n, 1)))
    for start in range(0, n, block):
        sims = vectors[start : start + block] @ vectors.T  # [block, n]
        for r in range(sims.shape[0]):
            i = start + r
            if taken[i]:
                continue
            taken[i] = True
            near = np.flatnonzero((sims[r] >= threshold) & ~taken)
            if len(near) > max_k - 1:
                order = np.argsort(-sims[r][near], kind="stable")[: max(0, max_k - 1)]
                near = np.sort(near[order])
            taken[near] = True
            clusters.append([i, *(int(j) for j in near)])
    return clusters


def threshold_for(config: Config, category: str) -> float:
    """The category's cluster threshold as a cosine (its min_docsearch_score when the
    config lists it, else the global one)."""
    score = (
        config.min_docsearch_score_for(category)
        if category in config.instructors
        else config.min_docsearch_score
    )
    return l2_threshold_to_cosine(score)


@dataclass
class Progress:
    """What a progress display shows: the phase, how far it is, and the counts so far."""

    phase: str  # "embedding" | "judging" | "done"
    done: int
    total: int
    counts: CullCounts | None = None


ProgressFn = Callable[[Progress], None]


def build_plan(
    rows: Sequence[CullRow],
    *,
    embedder: Embedder,
    config: Config,
    on_progress: ProgressFn | None = None,
    chunk: int = 256,
) -> CullPlan:
    """Embed the judged rows and cluster them per category. CPU-bound: run it in a thread
    when an event loop must stay responsive."""
    groups: dict[tuple[str, bool], list[int]] = {}
    units: list[Unit] = []
    for i, r in enumerate(rows):
        if r.category in PASS_THROUGH:
            units.append(Unit(r.category, [i], judged=False))
        else:
            groups.setdefault((r.category, r.plain), []).append(i)
    judged = [i for members in groups.values() for i in members]
    vectors = np.zeros((len(rows), embedder.dim), dtype=np.float32)
    for start in range(0, len(judged), chunk):
        part = judged[start : start + chunk]
        vectors[part] = embedder.embed([rows[i].text for i in part])
        if on_progress is not None:
            on_progress(Progress("embedding", start + len(part), len(judged)))
    for (category, _plain), members in groups.items():
        local = greedy_clusters(
            vectors[members], threshold_for(config, category), max(1, config.cull_max_k)
        )
        units.extend(Unit(category, [members[j] for j in c]) for c in local)
    units.sort(key=lambda u: u.members[0])  # output in input order
    return CullPlan(units)


# --- the judge --------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    good: bool
    #: why the judge gave no answer (the row then counts as good); None when it answered
    error: str | None = None


_WORD = re.compile(r"\b(GOOD|BAD)\b")
_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)


def parse_verdict(text: str) -> bool | None:
    """GOOD -> True, BAD -> False, neither -> None. A leading word decides; otherwise the
    last one (a model that reasons first states its answer at the end)."""
    text = _THINK.sub("", text).strip().upper()
    words = _WORD.findall(text)
    if not words:
        return None
    first = _WORD.match(text.lstrip("*`'\" \n"))
    word = first.group(1) if first else words[-1]
    return word == "GOOD"


def judge_threshold(config: Config) -> int:
    """``cull_threshold`` when set, else the original's ``scoring.threshold``, else 100."""
    if config.cull_threshold is not None:
        return config.cull_threshold
    raw = config.scoring.get("threshold")
    if raw is None:
        return DEFAULT_THRESHOLD
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise ConfigError([f"scoring.threshold: {raw!r} is not a whole number"]) from None
    if not 0 <= value <= 100:
        raise ConfigError([f"scoring.threshold: {value} is not between 0 and 100"])
    return value


def judge_model(config: Config) -> str:
    """``scoring.api_params.model`` or ``scoring.model`` when set, else ``model``."""
    params = config.scoring.get("api_params") or {}
    return str(params.get("model") or config.scoring.get("model") or config.model)


#: The judge's own prompt, shipped beside this module.
JUDGE_PROMPT = Path(__file__).resolve().parent / DEFAULT_PROMPT


def judge_prompt_template(config: Config) -> str:
    """``scoring.prompt_path`` (a user file), else ours; the original's ``filter.txt``,
    or our own file's name, without such a file, gets ours."""
    path = Path(str(config.scoring.get("prompt_path") or DEFAULT_PROMPT))
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.name in (DEFAULT_PROMPT, ORIGINAL_PROMPT):
        return JUDGE_PROMPT.read_text(encoding="utf-8")
    raise ConfigError([f"scoring.prompt_path: file not found: {path}"])


class Judge:
    """Asks the LLM whether one row is good enough to keep."""

    def __init__(self, config: Config, llm: LLMClient, *, threshold: int | None = None) -> None:
        self.llm = llm
        self.threshold = judge_threshold(config) if threshold is None else threshold
        self.template = judge_prompt_template(config)
        params = dict(config.scoring.get("api_params") or {})
        params.pop("model", None)
        self.model = judge_model(config)
        # A judge should be repeatable: temperature 0 unless the config says otherwise.
        self.params: dict[str, Any] = {**DEFAULT_API_PARAMS, "temperature": 0.0}
        self.params.update({k: v for k, v in params.items() if v is not None})

    def settings_key(self) -> dict[str, Any]:
        """What a verdict depends on, besides the row (part of the resume fingerprint)."""
        return {
            "model": self.model,
            "threshold": self.threshold,
            "params": self.params,
            "prompt": hashlib.sha256(self.template.encode()).hexdigest(),
        }

    def messages(self, row: CullRow) -> list[dict[str, str]]:
        has_system = bool(row.system and row.system.strip())
        system = (row.system or "").strip()
        prompt = render(
            self.template,
            instruction=row.instruction.strip(),
            response=row.response.strip(),
            threshold=self.threshold,
            system=system,
            system_note=", the system prompt that set the assistant up" if has_system else "",
            system_rule=(
                "- System prompt: the reply keeps to every instruction of the system prompt "
                "(persona, tone, format, length, constraints). Ignoring it costs most of the "
                "score.\n"
                if has_system
                else ""
            ),
            system_block=f"\n<system_prompt>\n{system}\n</system_prompt>\n" if has_system else "",
        )
        return [{"role": "user", "content": prompt}]

    async def __call__(self, row: CullRow) -> Verdict:
        try:
            c = await self.llm.complete(
                self.messages(row), model=self.model, instructor=INSTRUCTOR, params=self.params
            )
        except (AuthError, ModelNotFoundError):
            raise  # every call would fail the same way: stop rather than keep all
        except LLMError as exc:
            log.warning("judge failed on %s (%s); kept as good", row.where, exc.code)
            return Verdict(True, exc.code)
        good = parse_verdict(c.text)
        if good is None:
            log.warning("judge answered neither GOOD nor BAD on %s; kept as good", row.where)
            return Verdict(True, "unparseable")
        return Verdict(good)


# --- the decisions ------------------------------------------------------------------------


@dataclass
class CategoryTally:
    kept: int = 0
    dropped: int = 0
    passed: int = 0
    judge_errors: int = 0
    clusters: int = 0


@dataclass
class CullCounts:
    """Rows kept, dropped and passed through, judge errors, and clusters, per category."""

    by_category: dict[str, CategoryTally] = field(default_factory=dict)

    def cat(self, category: str) -> CategoryTally:
        return self.by_category.setdefault(category, CategoryTally())

    def total(self) -> CategoryTally:
        t = CategoryTally()
        for c in self.by_category.values():
            for k in ("kept", "dropped", "passed", "judge_errors", "clusters"):
                setattr(t, k, getattr(t, k) + getattr(c, k))
        return t

    def to_json(self) -> dict[str, Any]:
        return {k: asdict(v) for k, v in sorted(self.by_category.items())}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CullCounts:
        return cls({k: CategoryTally(**v) for k, v in data.items()})

    def summary(self) -> str:
        t = self.total()
        return (
            f"kept {t.kept}, dropped {t.dropped}, passed through {t.passed}, "
            f"judge errors {t.judge_errors} ({t.clusters} clusters)"
        )


@dataclass
class Decision:
    """The outcome of one unit: the row positions to write (none or one), and counts."""

    unit: int
    write: list[int]
    category: str
    kept: int = 0
    dropped: int = 0
    passed: int = 0
    judge_errors: int = 0
    clusters: int = 0

    def apply(self, counts: CullCounts) -> None:
        c = counts.cat(self.category)
        c.kept += self.kept
        c.dropped += self.dropped
        c.passed += self.passed
        c.judge_errors += self.judge_errors
        c.clusters += self.clusters


def decide(
    unit_index: int, unit: Unit, rows: Sequence[CullRow], verdicts: Sequence[Verdict]
) -> Decision:
    """Keep the longest good member (the first of equals); none when all are bad."""
    d = Decision(unit_index, [], unit.category, clusters=1)
    d.judge_errors = sum(1 for v in verdicts if v.error is not None)
    good = [i for i, v in zip(unit.members, verdicts, strict=True) if v.good]
    if good:
        best = max(good, key=lambda i: (rows[i].size, -unit.members.index(i)))
        d.write = [best]
        d.kept = 1
    d.dropped = len(unit.members) - d.kept
    return d


class Ledger(Protocol):
    """Durable progress of one cull. ``committed`` units are decided and their rows
    written; ``verdicts`` are judge answers already paid for (by row position)."""

    committed: int
    verdicts: dict[int, Verdict]
    counts: CullCounts

    async def record_verdict(self, index: int, verdict: Verdict) -> None:
        """Remember a verdict (best effort: losing one only costs a repeated call)."""
        ...

    async def commit(self, decisions: Sequence[Decision]) -> None:
        """Write the decisions' rows and advance ``committed`` past them, durably and in
        that order, so a crash in between repeats no row on resume."""
        ...


async def run_units(
    plan: CullPlan,
    rows: Sequence[CullRow],
    judge: Callable[[CullRow], Any],
    ledger: Ledger,
    *,
    concurrency: int = 8,
    on_progress: ProgressFn | None = None,
) -> CullCounts:
    """Decide every unit from ``ledger.committed`` on, judging up to ``concurrency`` rows
    at once; decisions are committed in order, in batches of those already finished."""
    sem = asyncio.Semaphore(max(1, concurrency))
    window = max(16, 4 * concurrency)
    total = len(plan.units)

    async def verdict(i: int) -> Verdict:
        cached = ledger.verdicts.get(i)
        if cached is not None:
            return cached
        async with sem:
            v: Verdict = await judge(rows[i])
        ledger.verdicts[i] = v
        await ledger.record_verdict(i, v)
        return v

    async def run(k: int) -> Decision:
        unit = plan.units[k]
        if not unit.judged:
            return Decision(k, list(unit.members), unit.category, passed=len(unit.members))
        verdicts = await asyncio.gather(*(verdict(i) for i in unit.members))
        return decide(k, unit, rows, verdicts)

    pending: deque[asyncio.Task[Decision]] = deque()
    nxt = ledger.committed
    last_report = 0.0
    try:
        while nxt < total or pending:
            while nxt < total and len(pending) < window:
                pending.append(asyncio.create_task(run(nxt)))
                nxt += 1
            batch = [await pending.popleft()]
            while pending and pending[0].done():
                batch.append(pending.popleft().result())
            await ledger.commit(batch)
            now = time.monotonic()
            if on_progress is not None and (now - last_report > 0.25 or not pending):
                last_report = now
                on_progress(Progress("judging", ledger.committed, total, ledger.counts))
    finally:
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    return ledger.counts


def fingerprint(
    lines: Iterable[str], rows: Sequence[CullRow], config: Config, extra: dict[str, Any]
) -> str:
    """Identifies what a plan and its verdicts were made from: the rows (``lines``, as
    read, in order) and every setting that shapes clusters or verdicts."""
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode())
        h.update(b"\n")
    cats = sorted({r.category for r in rows})
    settings = {
        "version": FORMAT_VERSION,
        "embedding_model": config.embedding_model,
        "cull_max_k": config.cull_max_k,
        "thresholds": {c: threshold_for(config, c) for c in cats},
        **extra,
    }
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def judge_concurrency(config: Config) -> int:
    """``judge.batch_size`` (the original's key) when set, else ``max_concurrency``; the
    LLM client's limiter bounds calls in flight either way."""
    size = config.judge.get("batch_size")
    if isinstance(size, int) and size >= 1:
        return size
    return config.max_concurrency


def make_judge_llm(config: Config, model: str) -> LLMClient:
    """The config's LLM client, with the judge's model priced for ``max_cost``."""
    from airoboros.llm import UsageMeter
    from airoboros.llm.factory import make_llm, prices_for

    prices = prices_for(config)
    if (p := config.price_for(model)) is not None:
        prices[model] = p
    meter = UsageMeter(max_tokens=config.max_tokens, max_cost=config.max_cost, prices=prices)
    return make_llm(config, meter=meter)


def load_embedder(config: Config) -> Embedder:
    from airoboros.embeddings import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(
        config.embedding_model, config.embedding_device, dtype=config.embedding_dtype
    )
