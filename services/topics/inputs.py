"""The material a batch carries (``GenerateBatch.inputs``), chosen on the planning side
from the job's store: writing rows for editor, cards for the card-based instructors,
passages for documents. The generator stays stateless: what it works from comes in the
message. Which material an instructor takes is declared in its catalog spec
(``airoboros.catalog.InstructorSpec.inputs``).

Every choice is derived from durable state (the store's rows, cards and counters) and the
controller's seeded random source, so a restarted controller, or another topics replica,
hands out the same kind of material without any memory of the last one. The documents
deck is the one thing with an order to keep: its position is a counter in the store
(``advance_cursor``), and each round of the deck is a permutation seeded by the job.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import re
from typing import Any, Protocol

from airoboros.cards import card_inputs
from airoboros.catalog import spec
from airoboros.config import Config
from airoboros.contracts import Artifact, Item
from airoboros.documents import DocumentsError, Passage, load_passages, passage_settings

log = logging.getLogger(__name__)

#: the user's names in gtkm transcripts and awareness chats
FIRST_NAMES = [
    "Ava", "Ben", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
    "Kira", "Liam", "Maya", "Nikolai", "Olivia", "Pavel", "Quinn", "Rosa", "Sam", "Tariq",
    "Uma", "Victor", "Wen", "Ximena", "Yusuf", "Zoe",
]  # fmt: skip
#: the categories stylized_response answers again in character, unless configured
DEFAULT_STYLIZED_CATEGORIES = ["experience", "general", "joke", "riddle", "trivia"]
#: cards of AI characters make no sense for "what do you feel right now" questions
AI_CARD = re.compile(r"\b(AI|artificial intelligence)\b", re.I)
CHARACTER_ASPECTS = ["their body and physical sensations", "their surroundings", "their senses"]

Inputs = list[dict[str, Any]]


class Sources(Protocol):
    """What the controller reads from the job's store to choose a batch's material."""

    async def rows(
        self, categories: list[str], n: int, *, unused_by: str | None = None
    ) -> list[Item]:
        """Up to ``n`` random dataset rows of these categories; with ``unused_by``, only
        rows whose response no row of that category has as its response yet."""
        ...

    async def cards(self) -> list[Artifact]:
        """Every character card of the job."""
        ...

    async def advance_cursor(self, instructor: str, n: int) -> int:
        """Move the instructor's durable cursor ``n`` places on; returns where it was."""
        ...


async def batch_inputs(
    config: Config,
    name: str,
    sources: Sources,
    batch_size: int,
    rng: random.Random,
    *,
    job_id: str,
) -> Inputs | None:
    """The material one batch of ``name`` needs. An empty list: none needed. None: nothing
    to work from (no writing rows for editor), so the instructor is skipped."""
    kind = spec(name).inputs
    if kind == "none":
        return []
    if kind == "writing":
        # Writing rows not edited yet first; once all are, any (each edit differs).
        rows = await sources.rows(["writing"], batch_size, unused_by=name)
        if not rows:
            rows = await sources.rows(["writing"], batch_size)
        return [{"text": r.response} for r in rows] if rows else None
    if kind == "passages":
        return await _passages(config, name, sources, batch_size, job_id)
    cards = await sources.cards()
    if kind == "taken_cards":
        return [{"taken": [c.name for c in cards][-200:]}]
    if kind == "stylized":
        cats = config.instructors[name].extra("categories") or DEFAULT_STYLIZED_CATEGORIES
        rows = await sources.rows(list(cats), batch_size)
        if not cards or not rows:
            return None
        return [
            {"instruction": r.instruction, "card": card_inputs([rng.choice(cards)])[0]}
            for r in rows
        ]
    if kind == "card":
        if not cards:
            return None
        return [{"card": card_inputs([rng.choice(cards)])[0], "user": rng.choice(FIRST_NAMES)}]
    if kind == "awareness":
        human = [c for c in cards if not AI_CARD.search(str(c.data))]
        roll = rng.random()
        if roll < 0.2:
            return [{"variant": "location"}]
        if roll < 0.4 or not human:
            return [{"variant": "temporal"}]
        return [
            {
                "variant": "character",
                "card": card_inputs([rng.choice(human)])[0],
                "user": rng.choice(FIRST_NAMES),
                "aspect": rng.choice(CHARACTER_ASPECTS),
            }
        ]
    if kind == "chat":
        if len(cards) < 2:
            return None
        n = rng.choices([2, 3, 4], weights=[0.85, 0.12, 0.03])[0]
        picked = rng.sample(cards, min(n, len(cards)))
        delimiter = rng.choice(["*", "~"]) if rng.random() < 2 / 3 else None
        return [{"cards": card_inputs(picked), "delimiter": delimiter}]
    raise ValueError(f"{name}: unknown kind of batch material {kind!r}")


async def _passages(
    config: Config, name: str, sources: Sources, batch_size: int, job_id: str
) -> Inputs | None:
    """Passages for one batch: enough for ``batch_size`` questions, none handed out twice
    before every passage of the folder has been handed out once."""
    inst = config.instructors[name]
    folder = inst.extra("documents_path")
    if not folder or not isinstance(folder, str):
        return None
    target, questions, _ = passage_settings(inst)
    try:
        passages = await asyncio.to_thread(load_passages, folder, target)
    except DocumentsError as exc:
        log.warning("%s: documents_path: %s", name, exc)
        return None
    if not passages:
        return None
    n = min(len(passages), max(1, math.ceil(batch_size / questions)))
    start = await sources.advance_cursor(name, n)
    return [p.to_input() for p in deal(passages, start, n, seed=f"{job_id}:{name}")]


def deal(passages: list[Passage], start: int, n: int, *, seed: str) -> list[Passage]:
    """Passages ``start`` .. ``start + n - 1`` of an endless deck: round after round, each
    round every passage once, in an order seeded by ``seed`` and the round's number. A
    passage already dealt in this hand (at a round's turn) is skipped for the next."""
    keys = sorted(passages, key=lambda p: p.key)
    size = len(keys)
    rounds: dict[int, list[Passage]] = {}

    def at(position: int) -> Passage:
        r = position // size
        if r not in rounds:
            digest = hashlib.sha256(f"{seed}:{r}".encode()).digest()
            order = list(keys)
            random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
            rounds[r] = order
        return rounds[r][position % size]

    out: list[Passage] = []
    taken: set[str] = set()
    position = start
    while len(out) < n and position < start + 2 * size:
        p = at(position)
        position += 1
        if p.key not in taken:
            taken.add(p.key)
            out.append(p)
    return out
