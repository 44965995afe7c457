"""The instructor catalog: what every category is, as a declared contract.

The generator runs instructors (``airoboros.generator.instructors``); the topics service
plans them (phases, topics, batch sizes, the material a batch carries) and validates the
configs that name them. Neither imports the other: what the planning side needs to know of
an instructor is declared here, as data, and the generator's classes take their planning
attributes from these specs (a test holds the two to each other).

``validate_instructor`` checks a config block's instructor-specific keys, each problem as
``"key: message"``; ``parse_config`` prefixes them with ``instructors.<name>.``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from airoboros.config import InstructorConfig

#: The phases of a job, in order. An instructor's batches are dispatched only once every
#: instructor of the earlier phases is done: editor needs writing rows, the card-based
#: instructors need the cards, and the cards come after the main phase (as the original).
PHASES = ("main", "editor", "cards", "characters")

#: What the controller hands a batch, chosen on its side from the job's store (see
#: airoboros.topics.inputs): nothing, writing rows to edit, the names of the cards taken,
#: rows with a card, a card, an awareness variant, cards for a chat, or passages.
InputKind = Literal[
    "none", "writing", "taken_cards", "stylized", "card", "awareness", "chat", "passages"
]

#: Prompt files packaged with the generator (services/generator/prompts/). A prompt_path
#: (or seed_path) naming one of these is valid even where no such file is on disk: the
#: generator falls back to its own copy. tests/unit/test_catalog.py holds this list to
#: the folder.
PACKAGED_PROMPTS = frozenset(
    {
        "agent.txt", "awareness_character.txt", "awareness_location.txt",
        "awareness_temporal.txt", "card.txt", "character.txt", "coding.txt",
        "contextual.txt", "contextual_response.txt", "cot.txt", "cot_response.txt",
        "counterfactual_contextual.txt", "counterfactual_contextual_response.txt",
        "detailed_writing.txt", "detailed_writing_response.txt",
        "detailed_writing_seeds.txt", "documents.txt", "editor.txt", "experience.txt",
        "general.txt", "gtkm.txt", "joke.txt", "misconception.txt", "multiple_choice.txt",
        "orca.txt", "plan.txt", "riddle.txt", "roleplay.txt", "rp_setting.txt", "song.txt",
        "trivia.txt", "wordgame.txt", "writing.txt", "writing_response.txt",
    }
)  # fmt: skip

Check = Callable[[InstructorConfig], list[str]]


@dataclass(frozen=True)
class InstructorSpec:
    """What planning needs to know of one instructor."""

    name: str
    #: the job phase it runs in (see PHASES)
    phase: str = "main"
    #: its prompt takes topics ({topics}/{topic})
    uses_topics: bool = False
    #: how topics are picked per batch: "rotate" (sequential from a random start) or
    #: "sample"
    topic_mode: str = "rotate"
    #: which dedupe index its candidates are screened against: "dataset" (the job's,
    #: shared by every instructor), "own" (one for this instructor alone: a re-answered
    #: row must not be rejected as a copy of its source) or "none"
    dedupe_scope: str = "dataset"
    #: counted rows one requested item is expected to make before any batch has finished
    #: (the controller learns the true yield from then on): batches are sized by it
    rows_per_item: float = 1.0
    #: the material the controller puts in each batch (``GenerateBatch.inputs``)
    inputs: InputKind = "none"
    #: what that material is, for the message when there is none ("writing rows")
    needs: str = "source material"
    #: categories it needs that a config may not list (cards for rp)
    implies: tuple[str, ...] = ()
    #: checks of its own keys, beyond the prompt paths every instructor has
    checks: tuple[Check, ...] = ()


# --- checks of instructor-specific keys -----------------------------------------------


def prompt_exists(name_or_path: str) -> bool:
    """A user file, or the name of a packaged prompt (which the generator falls back to)."""
    return Path(name_or_path).is_file() or Path(name_or_path).name in PACKAGED_PROMPTS


def _prompt_paths(cfg: InstructorConfig) -> list[str]:
    problems: list[str] = []
    if cfg.prompt_path and not prompt_exists(cfg.prompt_path):
        problems.append(f"prompt_path: file not found: {cfg.prompt_path}")
    if cfg.response_prompt_path and not prompt_exists(cfg.response_prompt_path):
        problems.append(f"response_prompt_path: file not found: {cfg.response_prompt_path}")
    return problems


def _list_of_strings(key: str, what: str = "strings") -> Check:
    def check(cfg: InstructorConfig) -> list[str]:
        v = cfg.extra(key)
        if v is not None and (not isinstance(v, list) or not all(isinstance(s, str) for s in v)):
            return [f"{key}: must be a list of {what}"]
        return []

    return check


def _ratio(key: str, default: float) -> Check:
    def check(cfg: InstructorConfig) -> list[str]:
        v = cfg.extra(key, default)
        if not isinstance(v, int | float) or not 0 <= v <= 1:
            return [f"{key}: must be a number between 0 and 1"]
        return []

    return check


def positive_int_problem(cfg: InstructorConfig, key: str) -> str | None:
    v = cfg.extra(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        return f"{key}: must be a positive whole number of words"
    return None


def _word_count(cfg: InstructorConfig) -> list[str]:
    p = positive_int_problem(cfg, "word_count")
    return [p] if p else []


def _coding(cfg: InstructorConfig) -> list[str]:
    problems = []
    langs = cfg.extra("coding_languages")
    if not langs or not isinstance(langs, list):
        problems.append("coding_languages: required, a list of programming languages")
    rs = cfg.extra("related_software")
    if rs is not None and not isinstance(rs, list):
        problems.append("related_software: must be a list")
    return problems


def _non_empty_lists(*keys: str) -> Check:
    def check(cfg: InstructorConfig) -> list[str]:
        problems = []
        for key in keys:
            v = cfg.extra(key)
            if v is not None and (not isinstance(v, list) or not v):
                problems.append(f"{key}: must be a non-empty list")
        return problems

    return check


_EXAMPLE = re.compile(r"BEGINEXAMPLE\s*(.*?)\s*ENDEXAMPLE", re.S)


def read_seed_tasks(source: Path) -> list[str]:
    """Seed tasks, without their BEGINEXAMPLE/ENDEXAMPLE markers, from a folder of
    ``*.txt`` files (one seed each, the original's layout) or one file of BEGINEXAMPLE ...
    ENDEXAMPLE blocks (a file without blocks is one seed)."""
    files = sorted(source.glob("*.txt")) if source.is_dir() else [source]
    seeds: list[str] = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        blocks = _EXAMPLE.findall(text)
        if blocks:
            seeds.extend(b.strip() for b in blocks)
        else:
            seeds.append(text.strip())
    return [s for s in seeds if s]


def _seed_tasks(cfg: InstructorConfig) -> list[str]:
    seed_path = cfg.extra("seed_path")
    if seed_path is None:
        return []
    if not isinstance(seed_path, str):
        return ["seed_path: must be a path"]
    p = Path(seed_path)
    if p.exists():
        if not read_seed_tasks(p):
            return [f"seed_path: no seed tasks in {seed_path}"]
        return []
    if p.name in PACKAGED_PROMPTS or f"{p.stem}.txt" in PACKAGED_PROMPTS:
        return []
    return [f"seed_path: not found: {seed_path}"]


def _card_seeds(cfg: InstructorConfig) -> list[str]:
    seed = cfg.extra("seed_path")
    if seed is not None and not Path(str(seed)).is_dir():
        return [f"seed_path: not a folder: {seed}"]
    return []


def _turn_count(cfg: InstructorConfig) -> list[str]:
    turns = cfg.extra("turn_count", 50)
    if not isinstance(turns, int) or turns < 2:
        return ["turn_count: must be an integer of at least 2"]
    return []


def _documents(cfg: InstructorConfig) -> list[str]:
    from airoboros import documents as d

    return d.check_settings(cfg)


# --- the catalog --------------------------------------------------------------------------

_SPECS = [
    InstructorSpec("general", uses_topics=True, topic_mode="sample"),
    InstructorSpec("wordgame"),
    InstructorSpec("writing", uses_topics=True, checks=(_list_of_strings("styles"),)),
    InstructorSpec("coding", checks=(_coding, _ratio("plain_ratio", 0.5))),
    # About half of the questions are asked again for a detail row.
    InstructorSpec("trivia", rows_per_item=1.5),
    InstructorSpec("orca"),
    InstructorSpec("riddle"),
    InstructorSpec("joke"),
    InstructorSpec("agent"),
    InstructorSpec("multiple_choice", uses_topics=True, checks=(_ratio("contextual_ratio", 0.2),)),
    InstructorSpec(
        "contextual",
        uses_topics=True,
        checks=(_non_empty_lists("context_styles", "formatting_options"),),
    ),
    InstructorSpec("cot"),
    InstructorSpec("plan"),
    InstructorSpec("roleplay"),
    InstructorSpec("song"),
    InstructorSpec("misconception"),
    InstructorSpec("card"),
    InstructorSpec("experience", checks=(_word_count,)),
    InstructorSpec("detailed_writing", uses_topics=True, checks=(_word_count, _seed_tasks)),
    # Each fact makes two rows: the true and the falsified version.
    InstructorSpec("counterfactual_contextual", rows_per_item=2.0),
    InstructorSpec("documents", inputs="passages", checks=(_documents,)),
    # Its sources are chosen unused first (airoboros.topics.inputs); a dedupe reservation
    # would lose a writing row for good whenever its edit failed.
    InstructorSpec(
        "editor", phase="editor", dedupe_scope="none", inputs="writing", needs="writing rows"
    ),
    InstructorSpec(
        "character",
        phase="cards",
        dedupe_scope="own",
        inputs="taken_cards",
        checks=(_card_seeds,),
    ),
    # The card-based instructors run once the cards are made, and bring in `character`.
    # Screened against its own index: one character answers one instruction once.
    InstructorSpec(
        "stylized_response",
        phase="characters",
        dedupe_scope="own",
        inputs="stylized",
        needs="character cards and rows of the chosen categories",
        implies=("character",),
        checks=(_list_of_strings("categories", "category names"),),
    ),
    InstructorSpec(
        "gtkm",
        phase="characters",
        dedupe_scope="none",
        inputs="card",
        needs="character cards",
        implies=("character",),
    ),
    InstructorSpec(
        "awareness",
        phase="characters",
        inputs="awareness",
        needs="character cards",
        implies=("character",),
    ),
    # Screened on the setting, in its own index: no two chats from the same scene.
    InstructorSpec(
        "rp",
        phase="characters",
        uses_topics=True,
        dedupe_scope="own",
        inputs="chat",
        needs="at least two character cards",
        implies=("character",),
        checks=(_turn_count,),
    ),
]

CATALOG: dict[str, InstructorSpec] = {s.name: s for s in _SPECS}


def spec(name: str) -> InstructorSpec:
    """The spec of a category (a KeyError for one this version does not generate)."""
    return CATALOG[name]


def known_instructors() -> set[str]:
    """Every category this version generates (all of the original's, and documents)."""
    return set(CATALOG)


def validate_instructor(name: str, cfg: InstructorConfig) -> list[str]:
    """Problems with a block's instructor-specific keys, each as 'key: message'."""
    s = CATALOG.get(name)
    if s is None:
        return []
    problems = _prompt_paths(cfg)
    for check in s.checks:
        problems.extend(check(cfg))
    return problems
