"""Expert segmentation: split a dataset into one training set per expert.

Every row goes to the expert whose categories include its category (rows of categories
the map does not name go to a fallback expert, with a warning, unless the map says
``unmapped: drop``). Each expert's training set is its own rows plus a small sample of
every other expert's categories ("cross-sampling"), so an expert still answers sensibly
when the router picks it for a request that belongs elsewhere. Each expert also gets
routing samples (``{"instruction": system + " " + instruction}`` per own row) for the
router's embedding index. See docs/trainer.md, "Segmentation".

Everything here is pure Python on the core dependencies: no torch, no object store.
The one exception is ``split_experts`` (``--split-above``): it imports numpy and faiss when
called and takes the embedder as an argument.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from airoboros.errors import AiroborosError

#: The original's effective divisor: ``len(cat_map) * 0.6`` with its 22 mapped categories.
ORIGINAL_DIVISOR = 13.2
DEFAULT_CAP = 500
DEFAULT_FRACTION = 0.1
DEFAULT_SEED = 42
DEFAULT_FALLBACK = "general"
#: The routing-sample prefix for a row without a system prompt (the original's).
DEFAULT_SYSTEM = "A chat."
SUMMARY_FILE = "segmentation.json"
TRAINING_DIR = "training_data"
ROUTING_DIR = "routing_data"
SUMMARY_VERSION = 1

#: Categories the generator has that never become dataset rows (character cards are
#: artifacts the rp, gtkm, awareness and stylized_response instructors read).
NON_ROW_CATEGORIES = frozenset({"character"})

_EXPERT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

UnmappedPolicy = Literal["fallback", "drop"]


class SegmentError(AiroborosError):
    """Bad input to segmentation: a malformed row, an empty dataset or a bad expert map."""

    code = "invalid_input"


# --- the expert map ----------------------------------------------------------------------


@dataclass(frozen=True)
class Expert:
    name: str
    categories: tuple[str, ...]
    #: one line: the adapter folder's ``description.txt`` and the router's agent prompt
    description: str


@dataclass(frozen=True)
class Sampling:
    """Cross-sampling and routing parameters (docs/trainer.md explains each)."""

    #: at most this many rows of a category are set aside for other experts ...
    cap: int = DEFAULT_CAP
    #: ... and at most this fraction of it (at least one row)
    fraction: float = DEFAULT_FRACTION
    #: an expert with T own rows takes up to ``int(T / divisor)`` rows of each other category
    divisor: float = ORIGINAL_DIVISOR
    #: routing samples kept per expert (None: one per own row)
    max_routing_samples: int | None = None
    seed: int = DEFAULT_SEED


DEFAULT_EXPERTS: tuple[Expert, ...] = (
    Expert(
        "qa",
        (
            "quiz",
            "multiple_choice",
            "contextual",
            "counterfactual_contextual",
            "documents",
        ),
        "Answers questions from supplied text (closed-context passages with sources, "
        "documents, counterfactual passages) and multiple-choice questions.",
    ),
    Expert(
        "creative",
        (
            "card",
            "writing",
            "experience",
            "song",
            "roleplay",
            "gtkm",
            "rp",
            "detailed_writing",
            "joke",
            "stylized_response",
        ),
        "Creative writing and character play: stories, poems, songs, jokes, immersive "
        "experiences, character cards, roleplay and in-character replies.",
    ),
    Expert(
        "code",
        ("coding",),
        "Writes, explains and fixes source code in many programming languages.",
    ),
    Expert(
        "reasoning",
        ("cot", "theory_of_mind", "riddle", "orca", "reasoning_or_math"),
        "Step-by-step reasoning: math and logic problems, riddles, and weighing several "
        "candidate answers before choosing the best.",
    ),
    Expert(
        "function",
        ("agent", "plan"),
        "Picks a function or tool and its arguments as JSON/YAML from a list of available "
        "functions, and writes step-by-step plans that call tools.",
    ),
    Expert(
        "general",
        ("wordgame", "trivia", "general", "misconception", "awareness", "editor"),
        "General knowledge and everyday requests: trivia, common misconceptions, word games, "
        "editing and rewriting text, and questions about the assistant itself.",
    ),
)

_DEFAULT_DESCRIPTIONS = {e.name: e.description for e in DEFAULT_EXPERTS}


def _by_name(experts: Iterable[Expert]) -> dict[str, Expert]:
    return {e.name: e for e in experts}


@dataclass(frozen=True)
class ExpertMap:
    """Which expert owns which categories, and what happens to the rest."""

    #: expert name -> expert, in order (files, tables and the summary follow this order)
    experts: Mapping[str, Expert] = field(default_factory=lambda: _by_name(DEFAULT_EXPERTS))
    #: the expert that gets rows of unmapped categories (``unmapped: fallback``)
    fallback: str = DEFAULT_FALLBACK
    unmapped: UnmappedPolicy = "fallback"
    sampling: Sampling = field(default_factory=Sampling)
    #: where the map came from: a file path, or "default"
    source: str = "default"
    _owner: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems = _map_problems(self)
        if problems:
            raise SegmentError(_problems_line(self.source, problems))
        owner = {c: e.name for e in self.experts.values() for c in e.categories}
        object.__setattr__(self, "_owner", owner)

    @property
    def names(self) -> list[str]:
        return list(self.experts)

    def expert(self, name: str) -> Expert:
        return self.experts[name]

    def expert_for(self, category: str) -> str | None:
        """The expert that owns ``category``, or None when the map does not name it."""
        return self._owner.get(category)

    def categories(self) -> list[str]:
        return list(self._owner)

    def to_dict(self) -> dict[str, Any]:
        """The map in the experts-config YAML shape (``load_expert_map`` reads it back)."""
        return {
            "experts": {
                e.name: {"categories": list(e.categories), "description": e.description}
                for e in self.experts.values()
            },
            "fallback": self.fallback,
            "unmapped": self.unmapped,
            "sampling": _sampling_dict(self.sampling),
        }


def _map_problems(m: ExpertMap) -> list[str]:
    problems: list[str] = []
    if not m.experts:
        problems.append("experts: name at least one expert")
    seen_names: set[str] = set()
    owner: dict[str, str] = {}
    for key, e in m.experts.items():
        if key != e.name:
            problems.append(f"experts.{key}: holds an expert named {e.name!r}")
        if not _EXPERT_NAME.match(e.name):
            problems.append(
                f"experts.{e.name}: an expert name must be letters, digits, '_' or '-' "
                "(it names files)"
            )
        seen_names.add(e.name)
        if not e.description.strip():
            problems.append(f"experts.{e.name}.description: must not be empty")
        for c in e.categories:
            if not c:
                problems.append(f"experts.{e.name}.categories: an empty category name")
            elif c in owner and owner[c] != e.name:
                problems.append(
                    f"experts.{e.name}.categories: {c!r} is already in expert {owner[c]!r}"
                )
            owner.setdefault(c, e.name)
    if m.unmapped not in ("fallback", "drop"):
        problems.append(f"unmapped: must be 'fallback' or 'drop', not {m.unmapped!r}")
    elif m.unmapped == "fallback" and m.experts and m.fallback not in seen_names:
        problems.append(
            f"fallback: {m.fallback!r} is not an expert (one of {', '.join(sorted(seen_names))}), "
            "or set unmapped: drop"
        )
    s = m.sampling
    if s.cap < 1:
        problems.append("sampling.cap: must be at least 1")
    if not 0 < s.fraction <= 1:
        problems.append("sampling.fraction: must be above 0 and at most 1")
    if not s.divisor > 0:
        problems.append("sampling.divisor: must be above 0")
    if s.max_routing_samples is not None and s.max_routing_samples < 1:
        problems.append("sampling.max_routing_samples: must be at least 1 (or null: no cap)")
    return problems


def _problems_line(source: str, problems: list[str]) -> str:
    where = "" if source == "default" else f"{source}: "
    if len(problems) == 1:
        return f"invalid expert map: {where}{problems[0]}"
    return f"invalid expert map ({len(problems)} problems): {where}" + "; ".join(problems)


class _ExpertSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    categories: list[str] = Field(default_factory=list)
    description: str | None = None


class _SamplingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cap: int = DEFAULT_CAP
    fraction: float = DEFAULT_FRACTION
    divisor: float = ORIGINAL_DIVISOR
    max_routing_samples: int | None = None
    seed: int = DEFAULT_SEED


class _MapSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    experts: dict[str, _ExpertSpec] | None = None
    fallback: str = DEFAULT_FALLBACK
    unmapped: UnmappedPolicy = "fallback"
    sampling: _SamplingSpec = Field(default_factory=_SamplingSpec)


def expert_map_from_dict(data: Mapping[str, Any], *, source: str = "default") -> ExpertMap:
    """An ``ExpertMap`` from the experts-config shape. Without ``experts`` the default six
    are kept (the file then only changes ``fallback``, ``unmapped`` or ``sampling``); with
    it, the file's experts replace the defaults entirely."""
    try:
        spec = _MapSpec.model_validate(dict(data))
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in exc.errors()
        ]
        raise SegmentError(_problems_line(source, problems)) from None
    if spec.experts is None:
        experts = _by_name(DEFAULT_EXPERTS)
    else:
        missing = [
            f"experts.{name}.description: required for an expert that is not one of the "
            f"defaults ({', '.join(_DEFAULT_DESCRIPTIONS)})"
            for name, e in spec.experts.items()
            if e.description is None and name not in _DEFAULT_DESCRIPTIONS
        ]
        if missing:
            raise SegmentError(_problems_line(source, missing))
        experts = _by_name(
            Expert(
                name,
                tuple(e.categories),
                e.description if e.description is not None else _DEFAULT_DESCRIPTIONS[name],
            )
            for name, e in spec.experts.items()
        )
    s = spec.sampling
    return ExpertMap(
        experts=experts,
        fallback=spec.fallback,
        unmapped=spec.unmapped,
        sampling=Sampling(s.cap, s.fraction, s.divisor, s.max_routing_samples, s.seed),
        source=source,
    )


def load_expert_map(path: str | Path | None = None) -> ExpertMap:
    """The default map (``path`` None) or the one in a YAML file (docs/trainer.md)."""
    if path is None:
        return ExpertMap()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SegmentError(f"experts config not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SegmentError(f"cannot read experts config {p}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise SegmentError(f"{where}: not valid YAML ({problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SegmentError(f"{p}: the experts config must be a mapping with an 'experts' key")
    return expert_map_from_dict(data, source=str(p))


# --- reading rows -------------------------------------------------------------------------


def row_problem(row: Any) -> str | None:
    """Why ``row`` is not a dataset row, or None. Keys beyond the original's are allowed
    (and kept unchanged in the training files)."""
    if not isinstance(row, Mapping):
        return f"a row must be a JSON object, got {type(row).__name__}"
    for key in ("instruction", "response"):
        if key not in row:
            return f"{key}: missing"
        if not isinstance(row[key], str):
            return f"{key}: must be a string"
    for key in ("category", "system"):
        if row.get(key) is not None and not isinstance(row[key], str):
            return f"{key}: must be a string"
    return None


def iter_rows(paths: Sequence[str | Path]) -> Iterator[dict[str, Any]]:
    """The rows of JSONL files, in order; blank lines skipped. ``SegmentError`` naming
    ``file:line`` for a line that is not JSON or not a dataset row."""
    for path in map(Path, paths):
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            raise SegmentError(f"input file not found: {path}") from None
        except OSError as exc:
            raise SegmentError(f"cannot read {path}: {exc.strerror or exc}") from None
        with fh:
            # bytes, decoded line by line, so a bad byte is reported on its own line
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise SegmentError(f"{path}:{lineno}: not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SegmentError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                problem = row_problem(row)
                if problem:
                    raise SegmentError(f"{path}:{lineno}: {problem}")
                yield row


def read_rows(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Every row of the files; ``SegmentError`` when there is none."""
    if not paths:
        raise SegmentError("no input files")
    rows = list(iter_rows(paths))
    if not rows:
        raise SegmentError(f"empty dataset: no rows in {', '.join(map(str, paths))}")
    return rows


# --- segmentation --------------------------------------------------------------------------


@dataclass
class ExpertCounts:
    own: int = 0
    cross: int = 0
    routing: int = 0
    own_by_category: dict[str, int] = field(default_factory=dict)
    cross_by_category: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.own + self.cross


@dataclass
class Segmentation:
    expert_map: ExpertMap
    #: the parameters actually used (the map's, with any overrides given to ``segment``)
    sampling: Sampling
    #: expert -> its training rows, unchanged: own rows first, then cross-sampled rows
    training: dict[str, list[dict[str, Any]]]
    #: expert -> ``{"instruction": ...}`` routing samples
    routing: dict[str, list[dict[str, str]]]
    counts: dict[str, ExpertCounts]
    #: categories the map does not name -> their row count ("" for rows without one)
    unmapped: dict[str, int]
    dropped: int
    total_rows: int
    warnings: list[str]

    def summary(self) -> dict[str, Any]:
        """What ``segmentation.json`` holds."""
        m = self.expert_map
        return {
            "version": SUMMARY_VERSION,
            "total_rows": self.total_rows,
            "dropped_rows": self.dropped,
            "seed": self.sampling.seed,
            "experts": {
                e.name: {
                    "description": e.description,
                    "categories": list(e.categories),
                    "own": self.counts[e.name].own,
                    "cross": self.counts[e.name].cross,
                    "total": self.counts[e.name].total,
                    "routing": self.counts[e.name].routing,
                    "own_by_category": self.counts[e.name].own_by_category,
                    "cross_by_category": self.counts[e.name].cross_by_category,
                    "training_file": (
                        f"{TRAINING_DIR}/expert_{e.name}.jsonl" if self.training[e.name] else None
                    ),
                    "routing_file": (
                        f"{ROUTING_DIR}/expert_{e.name}.jsonl" if self.routing[e.name] else None
                    ),
                }
                for e in m.experts.values()
            },
            "unmapped": self.unmapped,
            "warnings": self.warnings,
            "map_source": m.source,
            "map": {**m.to_dict(), "sampling": _sampling_dict(self.sampling)},
        }


def _sampling_dict(s: Sampling) -> dict[str, Any]:
    return {
        "cap": s.cap,
        "fraction": s.fraction,
        "divisor": s.divisor,
        "max_routing_samples": s.max_routing_samples,
        "seed": s.seed,
    }


def cross_sample_size(n: int, cap: int, fraction: float) -> int:
    """Rows of a category of ``n`` rows set aside for other experts (the original's rule,
    with an empty category giving none instead of a ValueError)."""
    if n <= 0:
        return 0
    return min(cap, int(fraction * n)) or 1


def routing_row(row: Mapping[str, Any]) -> dict[str, str]:
    return {"instruction": f"{row.get('system') or DEFAULT_SYSTEM} {row['instruction']}"}


def _rng(seed: int, *parts: str) -> random.Random:
    # One generator per category (and per expert for routing), seeded from a string
    # (sha512, stable across processes): adding a category changes no other sample.
    return random.Random(":".join([str(seed), *parts]))


def segment(
    rows: Iterable[Mapping[str, Any]],
    expert_map: ExpertMap | None = None,
    *,
    seed: int | None = None,
    cap: int | None = None,
    fraction: float | None = None,
    divisor: float | None = None,
    max_routing_samples: int | None = None,
) -> Segmentation:
    """Split ``rows`` into per-expert training and routing sets.

    Keyword arguments left None take the map's ``sampling`` values. The result depends
    only on the rows (and their order), the map and these parameters: a rerun is
    identical. ``SegmentError`` for an empty dataset or a row that is not a dataset row.
    """
    m = expert_map if expert_map is not None else ExpertMap()
    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "seed": seed,
            "cap": cap,
            "fraction": fraction,
            "divisor": divisor,
            "max_routing_samples": max_routing_samples,
        }.items()
        if v is not None
    }
    if overrides:
        m = replace(m, sampling=replace(m.sampling, **overrides))  # validates again
    s = m.sampling

    by_category: dict[str, list[dict[str, Any]]] = {}
    total = 0
    for i, row in enumerate(rows, 1):
        problem = row_problem(row)
        if problem:
            raise SegmentError(f"row {i}: {problem}")
        by_category.setdefault(row.get("category") or "", []).append(dict(row))
        total += 1
    if not total:
        raise SegmentError("empty dataset: no rows to segment")

    # Which expert owns each category with rows; unmapped ones are warned, never lost silently.
    own_categories: dict[str, list[str]] = {e.name: list(e.categories) for e in m.experts.values()}
    unmapped = {c: len(r) for c, r in sorted(by_category.items()) if m.expert_for(c) is None}
    warnings: list[str] = []
    dropped = 0
    for c, n in unmapped.items():
        rows_word = "row" if n == 1 else "rows"
        what = f"{rows_word} without a category" if c == "" else f"{rows_word} of category {c!r}"
        if m.unmapped == "drop":
            dropped += n
            warnings.append(f"{n} {what} (not in the expert map) dropped (unmapped: drop)")
        else:
            own_categories[m.fallback].append(c)
            warnings.append(
                f"{n} {what} (not in the expert map) go to the fallback expert {m.fallback!r}"
            )

    samples: dict[str, list[dict[str, Any]]] = {}
    for cats in own_categories.values():
        for c in cats:
            rs = by_category.get(c, [])
            samples[c] = _rng(s.seed, "cross", c).sample(
                rs, cross_sample_size(len(rs), s.cap, s.fraction)
            )

    training: dict[str, list[dict[str, Any]]] = {}
    routing: dict[str, list[dict[str, str]]] = {}
    counts: dict[str, ExpertCounts] = {}
    for e in m.experts.values():
        stats = ExpertCounts()
        own: list[dict[str, Any]] = []
        for c in own_categories[e.name]:
            rs = by_category.get(c, [])
            if rs:
                own.extend(rs)
                stats.own_by_category[c] = len(rs)
        stats.own = len(own)
        per_category = int(len(own) / s.divisor)
        cross: list[dict[str, Any]] = []
        for other, cats in own_categories.items():
            if other == e.name:
                continue
            for c in cats:
                take = min(len(samples[c]), per_category)
                if take:
                    cross.extend(samples[c][:take])
                    stats.cross_by_category[c] = take
        stats.cross = len(cross)
        training[e.name] = own + cross

        route = [routing_row(r) for r in own]
        if s.max_routing_samples is not None and len(route) > s.max_routing_samples:
            keep = _rng(s.seed, "routing", e.name).sample(range(len(route)), s.max_routing_samples)
            route = [route[i] for i in sorted(keep)]
        routing[e.name] = route
        stats.routing = len(route)
        counts[e.name] = stats
        if not own:
            listed = ", ".join(own_categories[e.name]) or "none"
            warnings.append(
                f"expert {e.name!r} has no rows of its own (categories: {listed}): "
                "no training or routing file is written for it"
            )

    return Segmentation(
        expert_map=m,
        sampling=s,
        training=training,
        routing=routing,
        counts=counts,
        unmapped=unmapped,
        dropped=dropped,
        total_rows=total,
        warnings=warnings,
    )


# --- writing -------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_segmentation(seg: Segmentation, out_dir: str | Path) -> Path:
    """Write ``training_data/expert_<e>.jsonl``, ``routing_data/expert_<e>.jsonl`` (only for
    experts with rows) and ``segmentation.json``; returns the summary's path.

    ``expert_*.jsonl`` files in those two folders left by an earlier run for experts this
    segmentation does not write are removed, so the folder never mixes two runs; each file
    is written beside its place and renamed into it, the summary last."""
    out = Path(out_dir)
    written: dict[str, set[str]] = {TRAINING_DIR: set(), ROUTING_DIR: set()}
    for sub, sets in ((TRAINING_DIR, seg.training), (ROUTING_DIR, seg.routing)):
        folder = out / sub
        folder.mkdir(parents=True, exist_ok=True)
        for name, rows in sets.items():
            if rows:
                _write_jsonl(folder / f"expert_{name}.jsonl", rows)
                written[sub].add(f"expert_{name}.jsonl")
        for stale in folder.glob("expert_*.jsonl"):
            if stale.name not in written[sub]:
                stale.unlink()
    summary = out / SUMMARY_FILE
    tmp = summary.with_name(f".{summary.name}.tmp")
    tmp.write_text(json.dumps(seg.summary(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, summary)
    return summary


def summary_table(seg: Segmentation) -> list[str]:
    """The per-expert table the CLI prints."""
    width = max(len("expert"), *(len(n) for n in seg.counts))
    lines = [
        f"{'expert':<{width}}  {'own':>7}  {'cross':>7}  {'total':>7}  {'routing':>7}  categories"
    ]
    for name, c in seg.counts.items():
        cats = ", ".join(f"{k or '(no category)'} {v}" for k, v in c.own_by_category.items()) or "-"
        lines.append(
            f"{name:<{width}}  {c.own:>7}  {c.cross:>7}  {c.total:>7}  {c.routing:>7}  {cats}"
        )
    total = sum(c.total for c in seg.counts.values())
    lines.append(
        f"{seg.total_rows} rows in, {total} training rows out"
        + (f", {seg.dropped} dropped" if seg.dropped else "")
    )
    return lines


# --- automatic expert splitting ------------------------------------------------------------

#: ``--split-above``: the most clusters tried, the fewest rows a cluster may have, and the
#: silhouette (cosine) the best k must reach for the expert to be split at all
SPLIT_K_MAX = 6
SPLIT_MIN_ROWS = 5
SPLIT_MIN_SILHOUETTE = 0.05
#: a k whose clusters have two centroids closer than this (cosine similarity of the mean
#: vectors) is not a split into topics but into near-duplicates, and is not considered
SPLIT_MAX_CENTROID_SIMILARITY = 0.9
#: a cluster is named after a programming language when at least this share of its rows
#: mention it (and no other cluster of the expert has the same language)
LANGUAGE_SHARE = 0.5
SPLIT_FILE = "split.json"
SPLIT_DATASET = "dataset.jsonl"
SPLIT_MAP = "experts.yaml"

_LANGUAGES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE))
    for name, pattern in (
        ("python", r"\bpython\b|\bdef \w+\(|\bimport \w+|\bpandas\b|\bdjango\b|\bflask\b"),
        ("javascript", r"\bjavascript\b|\bnode\.?js\b|console\.log|\breact\b|\btypescript\b"),
        ("sql", r"\bsql\b|\bselect\b.+\bfrom\b|\bpostgres\w*\b|\bmysql\b|\bsqlite\b"),
        ("java", r"\bjava\b(?!script)|public static void"),
        ("cpp", r"\bc\+\+|\bcpp\b|#include"),
        ("csharp", r"\bc#|\bcsharp\b|\.net\b"),
        ("go", r"\bgolang\b|\bgo program\b|\bfunc main\(\)"),
        ("rust", r"\brust\b|\bfn main\(\)|\bcargo\b"),
        ("bash", r"\bbash\b|\bshell script\b"),
        ("html", r"\bhtml\b|\bcss\b"),
    )
)

_STOPWORDS_TEXT = (
    "a about above after again all also an and any are as at be because been before being "
    "below between both but by can could did do does doing down during each few for from "
    "further had has have having he her here hers him his how i if in into is it its itself "
    "just me more most my no nor not now of off on once only or other our out over own same "
    "she should so some such than that the their them then there these they this those "
    "through to too under until up very was we were what when where which while who whom why "
    "will with would you your yours chat give write using use make please create explain "
    "following one two given list example provide based new way"
)
_STOPWORDS = frozenset(_STOPWORDS_TEXT.split(" "))
_WORD = re.compile(r"[a-z][a-z0-9+#]{2,}")


@dataclass(frozen=True)
class SubExpert:
    name: str
    description: str
    #: indexes into the rows given to ``split_experts``
    rows: tuple[int, ...]
    top_terms: tuple[str, ...]
    language: str | None = None


@dataclass
class ExpertSplit:
    """What ``split_experts`` decided for one expert over the threshold."""

    expert: str
    rows: int
    #: k tried -> silhouette (k skipped for a too-small cluster are absent)
    silhouettes: dict[int, float]
    #: the chosen sub-experts; empty when the expert stays whole
    parts: list[SubExpert]
    reason: str


@dataclass
class SplitResult:
    #: the rows, relabelled: a split expert's rows get ``category`` = their sub-expert's
    #: name (the original category kept in ``source_category``)
    rows: list[dict[str, Any]]
    #: the map with each split expert replaced (in place) by its sub-experts
    expert_map: ExpertMap
    splits: list[ExpertSplit]

    def summary(self) -> dict[str, Any]:
        return {
            "version": SUMMARY_VERSION,
            "experts": {
                s.expert: {
                    "rows": s.rows,
                    "silhouettes": {str(k): round(v, 4) for k, v in s.silhouettes.items()},
                    "reason": s.reason,
                    "parts": {
                        p.name: {
                            "rows": len(p.rows),
                            "description": p.description,
                            "top_terms": list(p.top_terms),
                            "language": p.language,
                        }
                        for p in s.parts
                    },
                }
                for s in self.splits
            },
        }


def silhouette(vectors: Any, labels: Any) -> float:
    """Mean silhouette with cosine distance (rows of ``vectors`` are unit length)."""
    import numpy as np

    x = np.asarray(vectors, dtype=np.float32)
    lab = np.asarray(labels)
    ks = np.unique(lab)
    if len(ks) < 2:
        return -1.0
    dist = 1.0 - x @ x.T
    n = len(x)
    # mean distance of each row to every cluster (its own excludes itself)
    means = np.zeros((n, len(ks)), dtype=np.float64)
    for j, k in enumerate(ks):
        member = lab == k
        total = dist[:, member].sum(axis=1)
        size = member.sum()
        own = lab == k
        means[:, j] = np.where(own, total / max(size - 1, 1), total / size)
    own_idx = np.searchsorted(ks, lab)
    a = means[np.arange(n), own_idx]
    means[np.arange(n), own_idx] = np.inf
    b = means.min(axis=1)
    s = np.where(np.maximum(a, b) > 0, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    sizes = np.bincount(own_idx)
    s[sizes[own_idx] == 1] = 0.0
    return float(s.mean())


def _kmeans(vectors: Any, k: int, seed: int) -> Any:
    import faiss
    import numpy as np

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    km = faiss.Kmeans(
        x.shape[1], k, niter=50, nredo=5, seed=seed, spherical=True, verbose=False,
        min_points_per_centroid=1,
    )  # fmt: skip
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign[:, 0]


def _terms(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]


def _top_terms(clusters: list[list[str]], n: int = 5) -> list[list[str]]:
    """Per cluster, its most distinctive words: term frequency in the cluster times the
    inverse cluster frequency (TF-IDF with each cluster as one document)."""
    import math
    from collections import Counter

    counts = [Counter(t for text in texts for t in set(_terms(text))) for texts in clusters]
    df = Counter(t for c in counts for t in c)
    out: list[list[str]] = []
    for texts, c in zip(clusters, counts, strict=True):
        size = max(len(texts), 1)
        scored = sorted(
            ((v / size) * math.log((1 + len(clusters)) / df[t]), t) for t, v in c.items()
        )
        ranked = sorted(scored, key=lambda p: (-p[0], p[1]))
        out.append([t for _, t in ranked[:n]])
    return out


def _language(texts: list[str]) -> str | None:
    best: tuple[float, str] | None = None
    for name, pattern in _LANGUAGES:
        share = sum(1 for t in texts if pattern.search(t)) / max(len(texts), 1)
        if share >= LANGUAGE_SHARE and (best is None or share > best[0]):
            best = (share, name)
    return best[1] if best else None


def _slug(word: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_-]+", "-", word).strip("-_").lower()
    return s or "part"


def _max_centroid_similarity(vectors: Any, labels: Any, k: int) -> float:
    import numpy as np

    c = np.stack([vectors[labels == j].mean(axis=0) for j in range(k)])
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    sims = c @ c.T
    np.fill_diagonal(sims, -1.0)
    return float(sims.max())


def _choose_k(
    vectors: Any,
    seed: int,
    k_max: int,
    min_rows: int,
    max_centroid_similarity: float = SPLIT_MAX_CENTROID_SIMILARITY,
) -> tuple[dict[int, float], int, Any]:
    import numpy as np

    n = len(vectors)
    silhouettes: dict[int, float] = {}
    best_k, best_s, best_labels = 1, -1.0, None
    for k in range(2, k_max + 1):
        if k * min_rows > n:
            break
        labels = _kmeans(vectors, k, seed)
        if np.bincount(labels, minlength=k).min() < min_rows:
            continue
        if _max_centroid_similarity(vectors, labels, k) > max_centroid_similarity:
            continue
        s = silhouette(vectors, labels)
        silhouettes[k] = s
        if s > best_s + 1e-9:
            best_k, best_s, best_labels = k, s, labels
    return silhouettes, best_k, best_labels


def split_experts(
    rows: Sequence[Mapping[str, Any]],
    expert_map: ExpertMap,
    *,
    above: int,
    embed: Any,
    seed: int = DEFAULT_SEED,
    k_max: int = SPLIT_K_MAX,
    min_rows: int = SPLIT_MIN_ROWS,
    min_silhouette: float = SPLIT_MIN_SILHOUETTE,
) -> SplitResult:
    """Cluster every expert with more than ``above`` own rows into sub-experts.

    ``embed(list[str])`` returns unit vectors (``airoboros.embeddings``): the rows'
    instructions are embedded and clustered by spherical k-means (faiss.Kmeans, seeded),
    k = 2..``k_max``; the k with the best cosine silhouette among those whose clusters all
    have at least ``min_rows`` rows and whose centroids are all less similar than
    ``SPLIT_MAX_CENTROID_SIMILARITY`` (cosine) wins, and the expert stays whole when none reaches
    ``min_silhouette``. Clusters are ordered by their first row; each is named
    ``<expert>-<language>`` when most of its rows name one programming language, else
    ``<expert>-<top TF-IDF term>``, made unique. Deterministic for a seed."""
    import numpy as np

    if above < 1:
        raise SegmentError("--split-above: must be at least 1")
    m = expert_map
    owner: list[str | None] = []
    for i, row in enumerate(rows, 1):
        problem = row_problem(row)
        if problem:
            raise SegmentError(f"row {i}: {problem}")
        c = row.get("category") or ""
        mapped = m.expert_for(c)
        fallback_owner = m.fallback if m.unmapped == "fallback" else None
        owner.append(mapped if mapped is not None else fallback_owner)
    taken = {e for e in m.experts} | set(m.categories())
    out_rows = [dict(r) for r in rows]
    splits: list[ExpertSplit] = []
    replaced: dict[str, list[SubExpert]] = {}
    for e in m.experts.values():
        idx = [i for i, o in enumerate(owner) if o == e.name]
        if len(idx) <= above:
            continue
        texts = [str(rows[i]["instruction"]) for i in idx]
        vectors = np.asarray(embed(texts), dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
        sils, k, labels = _choose_k(vectors, seed, k_max, min_rows)
        if labels is None or sils[k] < min_silhouette:
            why = (
                f"best silhouette {max(sils.values()):.3f} < {min_silhouette}"
                if sils
                else "no k gives distinct clusters of enough rows"
            )
            splits.append(ExpertSplit(e.name, len(idx), sils, [], f"not split ({why})"))
            continue
        first: dict[int, int] = {}
        for pos, lab in enumerate(labels.tolist()):
            first.setdefault(int(lab), pos)
        order = sorted(first, key=lambda lab: first[lab])
        members = [[p for p, lab in enumerate(labels.tolist()) if lab == c] for c in order]
        full = [
            [f"{rows[idx[p]]['instruction']} {rows[idx[p]]['response']}" for p in ms]
            for ms in members
        ]
        langs = [_language(t) for t in full]
        terms = _top_terms([[texts[p] for p in ms] for ms in members])
        parts: list[SubExpert] = []
        for j, ms in enumerate(members):
            lang = langs[j] if langs[j] and langs.count(langs[j]) == 1 else None
            stem = lang or next(iter(terms[j]), "part")
            name = f"{e.name}-{_slug(stem)}"
            base, n = name, 2
            while name in taken:
                name, n = f"{base}-{n}", n + 1
            taken.add(name)
            top = tuple(terms[j])
            what = f"{lang} code" if lang else ", ".join(top[:5]) or "other requests"
            desc = f"{e.description.rstrip('. ')}; this part: {what}."
            parts.append(SubExpert(name, desc, tuple(idx[p] for p in ms), top, lang))
            for p in ms:
                row = out_rows[idx[p]]
                row["source_category"] = rows[idx[p]].get("category") or ""
                row["category"] = name
        splits.append(
            ExpertSplit(e.name, len(idx), sils, parts, f"split into {k} (silhouette {sils[k]:.3f})")
        )
        replaced[e.name] = parts
    experts: list[Expert] = []
    for e in m.experts.values():
        if e.name in replaced:
            experts.extend(Expert(p.name, (p.name,), p.description) for p in replaced[e.name])
        else:
            experts.append(e)
    fallback = m.fallback
    if fallback in replaced:
        fallback = replaced[fallback][0].name
    new_map = ExpertMap(
        experts=_by_name(experts),
        fallback=fallback,
        unmapped=m.unmapped,
        sampling=m.sampling,
        source=m.source if not replaced else f"{m.source} (split above {above})",
    )
    return SplitResult(out_rows, new_map, splits)


def write_split(result: SplitResult, out_dir: str | Path) -> None:
    """``split.json`` (the decisions), ``experts.yaml`` (the map with sub-experts) and
    ``dataset.jsonl`` (the relabelled rows): ``train-experts --dataset OUT/dataset.jsonl
    --experts-config OUT/experts.yaml`` trains the sub-experts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / SPLIT_DATASET, result.rows)
    (out / SPLIT_MAP).write_text(
        yaml.safe_dump(result.expert_map.to_dict(), sort_keys=False, allow_unicode=True),
        encoding="utf-8",
    )
    (out / SPLIT_FILE).write_text(
        json.dumps(result.summary(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
