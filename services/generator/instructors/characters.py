"""Instructors built on character cards: character (the cards), stylized_response, gtkm,
awareness and rp.

Cards are artifacts of the job, not dataset rows: the store keeps them unique by name,
and the controller hands them to the batches of the later phases through
``GenerateBatch.inputs``, so the generator itself stays stateless.
"""

from __future__ import annotations

import asyncio
import difflib
import random
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from airoboros.cards import CARD_KIND, card_data, card_name
from airoboros.contracts import Artifact, BatchStats, Candidate, GenerateBatch, Item
from airoboros.generator.instructors.base import Filtered, Instructor, load_prompt
from airoboros.generator.instructors.structured import (
    AWARENESS_CHARACTER,
    AWARENESS_WITH_CONTEXT,
    CHARACTERS,
    GTKM_QUESTIONS,
)
from airoboros.templates import render

#: rules appended to every in-character system prompt (never stored in the dataset)
CHARACTER_RULES = (
    "Stay in character at all times; never mention being an AI or a language model. "
    "Respect the character's era and knowledge. If a warning is truly needed, put it at the "
    "very end after the word REMINDER:."
)


# --- character ----------------------------------------------------------------------------

_CARD_BLOCK = re.compile(r"DESCRIPTION:\s*(.*?)\s*GUIDE:\s*(.*?)\s*(?=DESCRIPTION:|\Z)", re.S)
_NAME = re.compile(r"^\s*NAME:\s*(.+?)\s*$", re.M)

DEFAULT_SEEDS = [
    "NAME: Captain Oriel Vance\nA retired airship captain from a rain-soaked port city, "
    "gruff but fair, who speaks in clipped nautical phrases and hides a soft spot for "
    "stray cats. Born 1871; knows nothing past the age of steam.",
    "NAME: Pip Marlowe\nA cheerful twelve-year-old inventor who lives above her "
    "grandmother's bakery, talks very fast, loves terrible puns, and is certain every "
    "problem can be solved with springs and glue.",
]


class Character(Instructor):
    """Character cards (``DESCRIPTION:`` with a ``NAME:`` line, then ``GUIDE:``): stored
    as the job's artifacts, unique by name, never written as rows."""

    name = "character"
    prompt_file = "character.txt"
    filter_responses = False

    def _example(self) -> str:
        seed = self.ctx.inst.extra("seed_path")
        seeds = DEFAULT_SEEDS
        if seed:
            files = sorted(Path(str(seed)).glob("*.txt"))
            seeds = [f.read_text(encoding="utf-8").strip() for f in files] or DEFAULT_SEEDS
        return self.ctx.rng.choice(seeds)

    async def propose(self, task: GenerateBatch, stats: BatchStats) -> list[Candidate]:
        taken = task.inputs[0].get("taken", []) if task.inputs else []
        skip = ""
        if taken:
            skip = "Do not reuse any of these names: " + ", ".join(taken) + "."
        prompt = render(
            self.prompt_template,
            batch_size=task.batch_size,
            example=self._example(),
            skip=skip,
            language=self.ctx.language,
        )
        reply, found = await self.ask_shaped(
            prompt,
            replace(CHARACTERS, note=f"Write everything in {self.ctx.language}."),
            # The marker cards carry their name on the description's NAME: line.
            lambda text: [("", d, g) for d, g in parse_cards(text)],
        )
        # A JSON card's name becomes that NAME: line, so both read the same from here.
        described = [(f"NAME: {name}\n{d}" if name else d, g) for name, d, g in found]
        cards = self.usable(
            [c for c in described if _NAME.search(c[0])],
            reply,
            stats,
            texts=lambda c: c,
            limit=task.batch_size,
        )
        out = []
        for description, guide in cards:
            m = _NAME.search(description)
            assert m is not None  # parse_cards keeps only named cards
            name = m.group(1).strip()
            if name.lower() in {t.lower() for t in taken}:
                stats.duplicates += 1
                continue
            out.append(
                Candidate(
                    instruction=description,
                    response=guide,
                    dedupe_text=description,
                    meta={"name": name},
                )
            )
        return out

    async def respond(self, candidate: Candidate, stats: BatchStats) -> list[Artifact]:
        data = {"description": candidate.instruction, "stay_in_character": candidate.response}
        return [Artifact(kind=CARD_KIND, name=str(candidate.meta["name"]), data=data)]


def parse_cards(text: str) -> list[tuple[str, str]]:
    """(description, guide) pairs whose description has a NAME: line and both parts text."""
    out = []
    for description, guide in _CARD_BLOCK.findall(text):
        if _NAME.search(description) and guide.strip() and len(description.split()) > 3:
            out.append((description.strip(), guide.strip()))
    return out


class _CardUser(Instructor):
    filter_responses = False

    @staticmethod
    def system_for(card: dict[str, Any]) -> str:
        data = card_data(card)
        return (
            f"You are to take on the role of: {card_name(card)}\n"
            f"{data.get('description', '')}\n{data.get('stay_in_character', '')}"
        ).strip()


# --- stylized_response -------------------------------------------------------------------

SKIP_RULE = (
    "If answering in this character would not change the answer in any way, reply with "
    "only the word SKIP."
)


class StylizedResponse(_CardUser):
    """Rows of chosen categories answered again in character. The stored system prompt is
    the character alone (rules and the SKIP escape hatch are not stored)."""

    name = "stylized_response"

    async def propose(self, task: GenerateBatch, stats: BatchStats) -> list[Candidate]:
        return [
            Candidate(
                instruction=i["instruction"],
                dedupe_text=f"{i['card']['name']}\n{i['instruction']}",
                system=self.system_for(i["card"]),
            )
            for i in task.inputs
        ]

    async def respond(self, candidate: Candidate, stats: BatchStats) -> list[Item]:
        system = f"{candidate.system}\n\n{CHARACTER_RULES}\n{SKIP_RULE}"
        text = await self.ask(candidate.instruction, system=system)
        if re.search(r"\bSKIP\b", text):
            raise Filtered("the character would not change the answer (SKIP)")
        text = strip_reminder(text)
        if not text:
            raise Filtered("empty answer")
        return [self.item(candidate.instruction, text, system=candidate.system)]


def strip_reminder(text: str) -> str:
    return re.split(r"\bREMINDER:", text, maxsplit=1)[0].strip()


# --- gtkm --------------------------------------------------------------------------------

_QUESTION_LINE = re.compile(r"QUESTION:\s*(.*?)\s*(?=QUESTION:|\Z)", re.S)


class Gtkm(_CardUser):
    """ "Get to know me": questions to one character, answered in character, flattened into
    cumulative transcripts (one row per answer from the second on). One transcript is
    one unit of ``count``: its first row counts, the rest ride along."""

    name = "gtkm"
    prompt_file = "gtkm.txt"

    async def propose(self, task: GenerateBatch, stats: BatchStats) -> list[Candidate]:
        card, user = task.inputs[0]["card"], task.inputs[0]["user"]
        n = int(self.ctx.inst.extra("question_count", 20))
        prompt = render(
            self.prompt_template,
            name=card["name"],
            description=card_data(card).get("description", ""),
            question_count=n,
            language=self.ctx.language,
        )
        shape = replace(GTKM_QUESTIONS, note=f"Write the questions in {self.ctx.language}.")
        reply, items = await self.ask_shaped(
            prompt, shape, lambda text: [(q,) for q in _QUESTION_LINE.findall(text) if q]
        )
        found = [q for (q,) in items]
        questions = self.usable(found, reply, stats, texts=lambda q: (q,))
        if len(questions) < 2:
            if questions:
                stats.unparseable += 1  # one question makes no transcript
            return []
        return [
            Candidate(
                instruction=questions[0],
                meta={"card": card, "user": user, "questions": questions[:n]},
            )
        ]

    async def respond(self, candidate: Candidate, stats: BatchStats) -> list[Item]:
        card, user = candidate.meta["card"], candidate.meta["user"]
        name = card["name"]
        base = (
            f"A chat between {name} and {user}.\n"
            f"Description of {name}: {card_data(card).get('description', '')}\n"
            f"{card_data(card).get('stay_in_character', '')}"
        ).strip()
        system = f"{base}\n\n{CHARACTER_RULES}"
        answers = await asyncio.gather(
            *(self.ask(q, system=system) for q in candidate.meta["questions"]),
            return_exceptions=True,
        )
        pairs = [
            (q, strip_reminder(a))
            for q, a in zip(candidate.meta["questions"], answers, strict=True)
            if isinstance(a, str) and strip_reminder(a)
        ]
        stats.filtered += len(answers) - len(pairs)
        max_words = int(self.ctx.inst.extra("max_prompt_words", 2500))
        rows: list[Item] = []
        transcript = [base]
        for i, (q, a) in enumerate(pairs):
            prompt = "\n".join([*transcript, f"{user}: {q}"])
            if len(prompt.split()) > max_words:
                break
            if i >= 1:
                rows.append(
                    self.item(
                        prompt,
                        f"{name}: {a}",
                        skip_prompt_formatting=True,
                        counted=not rows,
                    )
                )
            transcript += [f"{user}: {q}", f"{name}: {a}"]
        if not rows:
            raise Filtered("too few answers for a transcript")
        return rows


# --- awareness ---------------------------------------------------------------------------

_AWARE_BLOCK = re.compile(
    r"QUESTION:\s*(?P<q>.*?)\s*(?:CONTEXT:\s*(?P<c>.*?)\s*)?(?<!CONTEXTUAL)ANSWER:\s*(?P<a>.*?)\s*"
    r"CONTEXTUALANSWER:\s*(?P<ca>.*?)\s*(?=QUESTION:|\Z)",
    re.S,
)


def parse_awareness(text: str, *, with_context: bool) -> list[dict[str, str]]:
    out = []
    for m in _AWARE_BLOCK.finditer(text):
        block = {k: (v or "").strip() for k, v in m.groupdict().items()}
        if not block["q"] or not block["a"] or not block["ca"]:
            continue
        if with_context and not block["c"]:
            continue
        out.append(block)
    return out


class Awareness(_CardUser):
    """Questions about the here and now. Location and time variants give a plain row (the
    assistant cannot know) and a row with the situation in the system prompt; the
    character variant gives the plain row and an in-character transcript row."""

    name = "awareness"

    async def propose(self, task: GenerateBatch, stats: BatchStats) -> list[Candidate]:
        spec: dict[str, Any] = task.inputs[0] if task.inputs else {"variant": "temporal"}
        variant = spec["variant"]
        card = spec.get("card")
        prompt = render(
            load_prompt(f"awareness_{variant}.txt"),
            batch_size=task.batch_size,
            language=self.ctx.language,
            name=card["name"] if card else "",
            character=card_data(card).get("description", "") if card else "",
            aspect=spec.get("aspect", ""),
        )
        with_context = variant != "character"
        shape = replace(
            AWARENESS_WITH_CONTEXT if with_context else AWARENESS_CHARACTER,
            note=f"Write in {self.ctx.language}.",
        )
        reply, items = await self.ask_shaped(
            prompt,
            shape,
            lambda text: [
                tuple(b[k] for k in ("q", "c", "a", "ca") if with_context or k != "c")
                for b in parse_awareness(text, with_context=with_context)
            ],
        )
        keys = ("q", "c", "a", "ca") if with_context else ("q", "a", "ca")
        blocks = self.usable(
            [{"c": "", **dict(zip(keys, item, strict=True))} for item in items],
            reply,
            stats,
            texts=lambda b: (b["q"],),
            limit=task.batch_size,
        )
        return [Candidate(instruction=b["q"], response=b["a"], meta={**b, **spec}) for b in blocks]

    async def respond(self, candidate: Candidate, stats: BatchStats) -> list[Item]:
        m = candidate.meta
        q = candidate.instruction
        rows = [self.item(q, m["a"])]
        if m["variant"] == "character":
            card, user = m["card"], m["user"]
            name = card["name"]
            answer = re.sub(rf"^\s*As {re.escape(name)},\s*", "", m["ca"])
            transcript = (
                f"A chat between {name} and {user}.\n{name}:\n"
                f"{card_data(card).get('description', '')}\n{user}: {q}"
            )
            rows.append(self.item(transcript, f"{name}: {answer}", skip_prompt_formatting=True))
        else:
            rows.append(self.item(q, m["ca"], system=f"A chat. {m['c']}"))
        return rows


# --- rp ----------------------------------------------------------------------------------

START_PHRASES = [
    "Let's break the ice.",
    "Start us off.",
    "Go ahead, begin.",
    "Kick off the chat.",
    "Let's get started.",
]
TURN_DIRECTIVES = [
    "Take the conversation deeper on the current subject.",
    "Politely disagree with something just said.",
    "Share a short anecdote that fits the moment.",
    "Make a light joke that suits your character.",
    "Ask one of the others a question.",
    "Move the conversation to a related subject.",
]
_NEXT = re.compile(r"\bNEXT:\s*([^\n]+?)\s*$", re.M)


class RpTurnError(Exception):
    pass


def parse_turn(text: str, speaker: str, others: Sequence[str]) -> tuple[str, str]:
    """(message, next speaker) from one generated turn. The message is cut at
    REMINDER:/RULES:, lines spoken by others are dropped, and NEXT: must name one of
    ``others`` (close spellings accepted); anything else is an RpTurnError."""
    text = re.split(r"\b(?:REMINDER|RULES):", text, maxsplit=1)[0]
    found = list(_NEXT.finditer(text))
    if not found:
        raise RpTurnError("no NEXT: line")
    m = found[-1]
    wanted = m.group(1).strip().strip(".*~\"'")
    body = text[: m.start()]
    lookup = {o.lower(): o for o in others}
    match = difflib.get_close_matches(wanted.lower(), list(lookup), n=1, cutoff=0.75)
    if not match:
        raise RpTurnError(f"NEXT: names nobody in the chat ({wanted!r})")
    lines = []
    for line in body.splitlines():
        said_by = re.match(r"^\s*([^:\n]{1,40}):", line)
        if said_by and said_by.group(1).strip().lower() in lookup:
            continue  # the model wrote another character's line
        lines.append(line)
    message = "\n".join(lines).strip()
    message = re.sub(rf"^\s*{re.escape(speaker)}:\s*", "", message)
    if not message:
        raise RpTurnError("empty message")
    return message, lookup[match[0]]


class Rp(_CardUser):
    """Multi-character chats. The first card plays the user; the others are the
    assistant's characters. Each turn ends with ``NEXT: <name>``, which picks who speaks
    next; a turn naming nobody is rerolled. One row per assistant turn (the transcript so
    far as the instruction, skip_prompt_formatting); the chat counts once."""

    name = "rp"
    prompt_file = "rp_setting.txt"

    def _training_system(self, cards: list[dict[str, Any]], setting: str, delim: str | None) -> str:
        names = [c["name"] for c in cards]
        parts = [f"This is a chat between {len(cards)} characters: {', '.join(names)}", ""]
        for c in cards:
            parts += [f"{c['name']}: {card_data(c).get('description', '')}", ""]
        parts.append(f"Setting for the chat:\n{setting}\nEnd of setting.")
        if delim:
            parts.append(f"Actions should be surrounded by {delim}, e.g. {delim}smiles{delim}")
        return "\n".join(parts).strip()

    async def propose(self, task: GenerateBatch, stats: BatchStats) -> list[Candidate]:
        spec = task.inputs[0]
        cards = spec["cards"]
        topic = task.topics[0] if task.topics else "anything the characters like"
        characters = "\n".join(f"{c['name']}: {card_data(c).get('description', '')}" for c in cards)
        setting = await self.ask(
            render(
                self.prompt_template, characters=characters, topic=topic, language=self.ctx.language
            )
        )
        return [Candidate(instruction=setting, meta=spec)]

    async def respond(self, candidate: Candidate, stats: BatchStats) -> list[Item]:
        cards: list[dict[str, Any]] = candidate.meta["cards"]
        delim: str | None = candidate.meta.get("delimiter")
        names = [c["name"] for c in cards]
        user, characters = names[0], names[1:]
        system = self._training_system(cards, candidate.instruction, delim)
        turn_count = int(self.ctx.inst.extra("turn_count", 50))
        rng = self.ctx.rng
        speaker = rng.choice(names)
        turns: list[tuple[str, str]] = []  # (speaker, message)
        while len(turns) < turn_count:
            others = [n for n in names if n != speaker]
            message, nxt = await self._turn(system, speaker, others, turns, delim, stats)
            turns.append((speaker, message))
            speaker = nxt
        return self._rows(system, user, characters, turns, rng)

    async def _turn(
        self,
        system: str,
        speaker: str,
        others: list[str],
        turns: list[tuple[str, str]],
        delim: str | None,
        stats: BatchStats,
    ) -> tuple[str, str]:
        history = "\n".join(f"{s}: {m}" for s, m in turns) or "(nobody has spoken yet)"
        directive = (
            f"As {speaker}, briefly start the conversation."
            if not turns
            else self.ctx.rng.choice(TURN_DIRECTIVES)
        )
        action_rule = (
            f"Put actions between {delim} characters and speech in plain text."
            if delim
            else "Write speech only."
        )
        prompt = (
            f"The chat so far:\n{history}\n\nWrite {speaker}'s next message. {directive} "
            f"Stay under 150 words, write as {speaker} only, in {self.ctx.language}. "
            f"{action_rule} End with a line NEXT: followed by the name of who speaks next, "
            f"one of: {', '.join(others)}."
        )
        sys_prompt = f"{system}\n\nYou are {speaker}.\n{CHARACTER_RULES}"
        last: Exception | None = None
        for _ in range(3):  # rerolls on an unusable turn
            try:
                text = await self.ask(prompt, system=sys_prompt)
                return parse_turn(text, speaker, others)
            except Filtered as exc:
                exc.count(stats)
                last = exc
            except RpTurnError as exc:
                stats.unparseable += 1
                last = exc
        raise Filtered(f"rp turn unusable three times ({last})")

    def _rows(
        self,
        system: str,
        user: str,
        characters: list[str],
        turns: list[tuple[str, str]],
        rng: random.Random,
    ) -> list[Item]:
        # Consecutive assistant-character turns make one assistant message.
        messages: list[tuple[str, str]] = []  # (role, "Name: text")
        if turns and turns[0][0] != user:
            messages.append(("user", rng.choice(START_PHRASES)))
        for speaker, text in turns:
            role = "user" if speaker == user else "assistant"
            line = f"{speaker}: {text}"
            if messages and messages[-1][0] == role == "assistant":
                messages[-1] = (role, messages[-1][1] + "\n" + line)
            else:
                messages.append((role, line))
        rows: list[Item] = []
        for i, (role, text) in enumerate(messages):
            if role != "assistant" or i == 0:
                continue
            prompt = "\n".join([system, "", *(t for _, t in messages[:i])])
            rows.append(self.item(prompt, text, skip_prompt_formatting=True, counted=not rows))
        if not rows:
            raise Filtered("a chat without an assistant turn")
        return rows


CHARACTERS_INSTRUCTORS: list[type[Instructor]] = [
    Character, StylizedResponse, Gtkm, Awareness, Rp,
]  # fmt: skip
