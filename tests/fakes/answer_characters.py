"""Scripted answers for the card-based instructors and editor (loaded by llm_server).

Real models slip in known ways, so this does too, at fixed rates: an rp turn that hands
over to nobody or speaks another character's line, a REMINDER: tail, a SKIP.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from tests.fakes.llm_server import _pick, paragraph, sentence

if TYPE_CHECKING:
    from tests.fakes.llm_server import ScriptedLLM

GIVEN = ["Ada", "Bram", "Cora", "Dev", "Edda", "Finn", "Gus", "Hana", "Ivo", "Juno", "Kai"]
TITLES = ["Captain", "Doctor", "Sister", "Professor", "Old", "Young", "Lady", "Master"]
SURNAMES = [
    "Ashgrove", "Bellweather", "Corrin", "Dunmore", "Everly", "Fairholt", "Grimsby",
    "Hollis", "Ironwood", "Juniper", "Kestrel", "Larkspur", "Merriweather", "Nettle",
    "Oakhart", "Penhallow", "Quillon", "Ravensworth", "Sallow", "Thistle",
]  # fmt: skip


def _last_user(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return ""


def _system(messages: list[dict[str, Any]]) -> str:
    return "\n".join(str(m.get("content", "")) for m in messages if m.get("role") == "system")


def answer(llm: ScriptedLLM, prompt: str, messages: list[dict[str, Any]]) -> str | None:
    rng = llm.rng
    user = _last_user(messages)
    system = _system(messages)
    if m := re.search(r"Invent (\d+) new, distinct characters", user):
        blocks = []
        for _ in range(int(m.group(1))):

            def make() -> str:
                return f"{rng.choice(TITLES)} {rng.choice(GIVEN)} {rng.choice(SURNAMES)}"

            name = llm._unique(make)
            w = _pick(rng)
            blocks.append(
                f"DESCRIPTION: NAME: {name}\n{name} is a {w['adj']} {w['noun2']} from "
                f"{w['place']} who loves every {w['noun']}. {sentence(rng)}\n"
                f"GUIDE: Speak as {name} would: {w['adj']}, fond of the {w['noun']}."
            )
        return "\n\n".join(blocks)
    if m := re.search(r"Write (\d+) questions that someone getting to know", user):
        return "\n".join(
            f"QUESTION: {llm._unique(lambda: sentence(rng).rstrip('.') + '?')}"
            for _ in range(int(m.group(1)))
        )
    if "End with a line NEXT:" in user:
        names = re.search(r"one of: (.+?)\.\s*$", user, re.S)
        others = [n.strip() for n in names.group(1).split(",")] if names else ["Nobody"]
        roll = rng.random()
        text = paragraph(rng, 1)
        if roll < 0.1:
            return f"{text}\nNEXT: Somebody Else Entirely"
        if roll < 0.2:
            text += f"\n{others[0]}: and I would answer for them, wrongly."
        return f"{text}\nNEXT: {rng.choice(others)}"
    if "Describe the setting of their conversation" in user:
        return paragraph(rng, 2)
    if "CONTEXTUALANSWER:" in user:
        n = int(m.group(1)) if (m := re.search(r"Write (\d+) questions", user)) else 3
        with_context = "a CONTEXT:" in user
        blocks = []
        for _ in range(n):
            q = llm._unique(lambda: sentence(rng).rstrip(".") + "?")
            ctx = f"CONTEXT: {sentence(rng)}\n" if with_context else ""
            blocks.append(
                f"QUESTION: {q}\n{ctx}ANSWER: I cannot know that from here. {sentence(rng)}\n"
                f"CONTEXTUALANSWER: {paragraph(rng, 1)}"
            )
        return "\n\n".join(blocks)
    if "Rewrite it so that it has these flaws" in user:
        text = user.split("TEXT:", 1)[1].strip()
        words = text.split()
        for i in range(0, len(words), 3):
            w = words[i]
            if len(w) > 3:
                words[i] = w[0] + w[2] + w[1] + w[3:]
        return " ".join(words) + " (sic)"
    if "Stay in character at all times" in system:
        roll = rng.random()
        if "take on the role of" in system and roll < 0.1:
            return "SKIP"
        text = paragraph(rng, 2)
        if roll > 0.8:
            text += "\nREMINDER: this is only a story."
        return text
    return None
