"""Scripted answers for the prompts of cot, plan, roleplay, song, misconception, card,
experience, detailed_writing and counterfactual_contextual.

Each prompt is recognised by a phrase of its own in the last user message (the earlier
messages of a conversation hold earlier prompts). Anything else returns None, so the
other plugins and the built-in shapes answer it. Instructions go through
``llm._unique`` so that ``duplicate_rate`` serves repeats the way the built-ins do.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from tests.fakes.llm_server import NOUNS, PLACES, ScriptedLLM, _pick, paragraph, sentence


def _last_user(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return ""


def _exactly(text: str, default: int = 5) -> int:
    m = re.search(r"exactly (\d+)", text)
    return int(m.group(1)) if m else default


def _words(llm: ScriptedLLM, n: int) -> str:
    """Paragraphs of at least ``n`` words in all."""
    paras: list[str] = []
    total = 0
    while total < n:
        p = paragraph(llm.rng, 3)
        paras.append(p)
        total += len(p.split())
    return "\n\n".join(paras)


# --- TSK lists --------------------------------------------------------------------------


def _tsk(llm: ScriptedLLM, prompt: str, make: Callable[[], str]) -> str:
    return "\n".join(f"TSK {i + 1}. {llm._unique(make)}" for i in range(_exactly(prompt)))


def cot_tasks(llm: ScriptedLLM, prompt: str, messages: list[dict[str, Any]]) -> str:
    rng = llm.rng

    def make() -> str:
        w = _pick(rng)
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(10, 90)
        return rng.choice(
            [
                f"A {w['noun']} in {w['place']} can {w['verb']} {a} {w['noun2']}s an hour and "
                f"a {w['adj']} helper works {b} times as fast. How long do they need together "
                f"for {c} {w['noun2']}s? Give several possible solutions, rank them, and pick "
                "the best answer.",
                f"A bag holds {a} {w['adj']} and {b} plain {w['noun']}s. What is the chance of "
                f"drawing two {w['adj']} ones in a row? Offer a few ways to reason about it, "
                "rank them, and choose the most convincing.",
                f"If {a} {w['noun']}s {w['verb']} {b} {w['noun2']}s in {c} minutes in "
                f"{w['place']}, how long would {a + b} of them take? Consider different readings "
                "of the problem, rank your solutions and state the best one.",
            ]
        )

    return _tsk(llm, prompt, make)


PLAN_TOOLS = [
    "WebSearch[input]: searches the web and returns snippets with links.",
    "PageReader[input]: returns the plain text of one or more links.",
    "LinkPicker[input]: extracts the links from a text.",
    "Calculator[input]: evaluates an arithmetic expression.",
    "MapLookup[input]: returns the coordinates and region of a place.",
    "WeatherArchive[input]: returns past weather records for a place and date.",
    "Translator[input]: translates a text into English.",
    "NewsFeed[input]: lists recent news stories about the input.",
    "Encyclopedia[input]: returns the article about a subject.",
    "TableReader[input]: extracts the rows of tables found in a text.",
]
QA_TOOLS = ["QA", "AnswerBot", "Oracle", "ReaderModel"]


def plan_tasks(llm: ScriptedLLM, prompt: str, messages: list[dict[str, Any]]) -> str:
    rng = llm.rng

    def make() -> str:
        w = _pick(rng)
        tools = rng.sample(PLAN_TOOLS, rng.randint(4, 6))
        qa = rng.choice(QA_TOOLS)
        tools.insert(rng.randint(0, len(tools)), f"{qa}[input]: answers a question from a passage.")
        notation = rng.choice(["#E1, #E2", ":evidence0:, :evidence1:"])
        question = (
            f"Who first tried to {w['verb']} the {w['adj']} {w['noun']} of {w['place']}, and "
            f"what happened to the {w['noun2']} afterwards?"
        )
        return (
            f"Plan how to answer the question with these tools, one call per step, storing "
            f"results in {notation} and so on.\nTools:\n"
            + "\n".join(tools)
            + f"\nOutput format: Plan: ... then the evidence line.\nQuestion: {question}"
        )

    return _tsk(llm, prompt, make)


def plan_answer(llm: ScriptedLLM, prompt: str, messages: list[dict[str, Any]]) -> str:
    tools = re.findall(r"^(\w+)\[input\]", prompt, re.M) or ["Search", "QA"]
    evidence = ":evidence{}:" if ":evidence0:" in prompt else "#E{}"
    start = 0 if ":evidence0:" in prompt else 1
    q = prompt.rsplit("Question:", 1)[-1].strip()
    lines = []
    for i, tool in enumerate(tools[:3]):
        var = evidence.format(start + i)
        prev = f" given {evidence.format(start + i - 1)}" if i else ""
        lines += [f"Plan: use {tool} to move closer to the answer{prev}.", f"{var} = {tool}[{q}]"]
    last = evidence.format(start + min(3, len(tools)) - 1)
    return "\n".join(lines) + ("\nAnswer: " if start == 0 else "\nFinal answer: ") + last


CHARACTERS = [
    "Sherlock Holmes", "Captain Ahab", "Yoda", "Hermione Granger", "Mr. Darcy",
    "Gandalf", "Mary Poppins", "Jay Gatsby", "Don Quixote", "Willy Wonka",
]  # fmt: skip
FORMS = [
    "poem",
    "letter",
    "short story",
    "speech",
    "piece of advice",
    "product review",
    "diary entry",
]


def roleplay_tasks(llm: ScriptedLLM, prompt: str, messages: list[dict[str, Any]]) -> str:
    rng = llm.rng

    def make() -> str:
        w = _pick(rng)
        return (
            f"Write a {rng.choice(FORMS)} about the {w['adj']} {w['noun']} of {w['place']} "
            f"in the style of {rng.choice(CHARACTERS)}."
        )

    return _tsk(llm, prompt, make)


GENRES = ["folk", "blues", "sea shanty", "country", "jazz", "punk", "lullaby", "hip hop"]


def song_tasks(llm: ScriptedLLM, prompt: str, messages: list[dict[str, Any]]) -> str:
    rng = llm.rng

    def make() -> str:
        w = _pick(rng)
        shape = rng.choice(["two verses and a chorus", "an AABB rhyme scheme", "a bridge"])
        return (
            f"Compose {rng.choice(GENRES)} lyrics about a {w['noun2']} who helps a {w['adj']} "
            f"{w['noun']} in {w['place']}, with {shape}."
        )

    return _tsk(llm, prompt, make)


def cot_answer(llm: ScriptedLLM, prompt: str, messages: list[dict[str, Any]]) -> str:
    rng = llm.rng
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    return (
        f"Solution 1:\n{paragraph(rng, 2)}\nFinal answer: {a}\n\n"
        f"Solution 2:\n{paragraph(rng, 2)}\nFinal answer: {b}\n\n"
        "Ranking of solutions from best to worst:\n"
        "1. Solution 1: it uses every fact given.\n2. Solution 2: it assumes too much.\n\n"
        f"Best and final answer: {a}"
    )


# --- inline pairs -----------------------------------------------------------------------


def misconception_pairs(llm: ScriptedLLM, prompt: str, messages: list[dict[str, Any]]) -> str:
    rng = llm.rng
    out = []
    for _ in range(_exactly(prompt)):
        w = _pick(rng)
        q = llm._unique(
            lambda w=w: rng.choice(
                [
                    f"Do {w['noun']}s in {w['place']} really {w['verb']} {w['noun2']}s only at night?",
                    f"Is a {w['adj']} {w['noun']} more dangerous to a {w['noun2']} than a calm one?",
                    f"Why does every {w['noun']} in {w['place']} turn {w['adj']} in winter?",
                ]
            )
        )
        out.append(
            f"QUESTION: {q}\nANSWER: No. {paragraph(rng, 2)} The belief comes from old "
            f"stories told in {w['place']}."
        )
    return "\n\n".join(out)


CARD_KINDS = ["creature", "tavern", "starship", "spell", "city", "guild", "heirloom", "dish"]
CARD_ATTRS = ["Name", "Origin", "Appearance", "Temper", "Secret", "Rival", "Motto", "Price"]


def card_pairs(llm: ScriptedLLM, prompt: str, messages: list[dict[str, Any]]) -> str:
    rng = llm.rng
    out = []
    for _ in range(_exactly(prompt)):
        w = _pick(rng)
        attrs = rng.sample(CARD_ATTRS, rng.randint(4, 6))
        kind = rng.choice(CARD_KINDS)
        req = llm._unique(
            lambda w=w, attrs=attrs, kind=kind: (
                f"Please create a card for a {w['adj']} {kind} from {w['place']} tied to a "
                f"{w['noun']}. Attributes to fill in:\n"
                + "\n".join(f"{a}: the {a.lower()} of the {kind}." for a in attrs)
            )
        )
        card = "\n".join(f"{a}: {sentence(rng)}" for a in attrs)
        out.append(f"PROMPT: {req}\nANSWER: {card}")
    return "\n\n".join(out)


# --- long form --------------------------------------------------------------------------


def experience(llm: ScriptedLLM, prompt: str, messages: list[dict[str, Any]]) -> str:
    rng = llm.rng
    m = re.search(r"about (\d+) words long", prompt)
    n = int(m.group(1)) if m else 300

    def make() -> str:
        w = _pick(rng)
        return (
            f"Far beyond {w['place']} lies a {w['adj']} valley where a {w['noun']} keeps watch "
            f"over a {w['noun2']}. {paragraph(rng, 2)}"
        )

    setting = llm._unique(make)
    request = rng.choice(["Take me through this place.", "Guide me on a walk here."])
    return f"SETTING:\n{setting}\n\n{request}\n\nEXPERIENCE:\n{_words(llm, n)}"


def writing_task(llm: ScriptedLLM, prompt: str, messages: list[dict[str, Any]]) -> str:
    rng = llm.rng
    topic = re.search(r'related to "([^"]+)"', prompt)

    def make() -> str:
        w = _pick(rng)
        about = f" It must mention {topic.group(1)}." if topic else ""
        return (
            f"Write a long story about a {w['noun']} from {w['place']} who sets out to "
            f"{w['verb']} the {w['adj']} {w['noun2']} before the first snow. Cover the "
            f"journey, a betrayal and a reconciliation.{about}"
        )

    return llm._unique(make)


def writing_part(llm: ScriptedLLM, prompt: str, messages: list[dict[str, Any]]) -> str:
    m = re.search(r"at least (\d+) words", prompt)
    return _words(llm, int(m.group(1)) if m else 200)


def writing_combine(llm: ScriptedLLM, prompt: str, messages: list[dict[str, Any]]) -> str:
    parts = [str(m["content"]) for m in messages if m.get("role") == "assistant"]
    return "\n\n".join(parts) if parts else _words(llm, 300)


# --- counterfactual_contextual ----------------------------------------------------------


def _falsify(llm: ScriptedLLM, text: str) -> str:
    rng = llm.rng
    out = re.sub(r"\d+", lambda m: str(int(m.group()) + rng.randint(3, 40)), text)
    for place in PLACES:
        if place in out:
            out = out.replace(place, rng.choice([p for p in PLACES if p != place]))
    if out == text:
        out += f" It was later moved to {rng.choice(PLACES)}."
    return out + f" Some say a {rng.choice(NOUNS)} was there too."


def counterfactual(llm: ScriptedLLM, prompt: str, messages: list[dict[str, Any]]) -> str:
    rng = llm.rng
    m = re.search(r"write (\d+) short factual passages", prompt)
    n = int(m.group(1)) if m else 5
    facts, counters, questions = [], [], []
    for i in range(n):
        w = _pick(rng)
        fact = llm._unique(
            lambda w=w: (
                f"The {w['adj']} {w['noun']} of {w['place']} was first described in "
                f"{rng.randint(1500, 1990)} by a travelling {w['noun2']}. " + paragraph(rng, 2)
            )
        )
        url = f"https://en.wikipedia.org/wiki/{w['noun'].title()}_{rng.randint(1, 99999)}"
        facts.append(f"{i + 1}. {fact} [source: {url}]")
        counters.append(f"{i + 1}. {_falsify(llm, fact)}")
        questions.append(f"{i + 1}. In which year and where was it first described?")
    return (
        "FACTS:\n" + "\n".join(facts) + "\n\nCOUNTER:\n" + "\n".join(counters)
        + "\n\nQUESTIONS:\n" + "\n".join(questions)
    )  # fmt: skip


def counterfactual_answer(llm: ScriptedLLM, prompt: str, messages: list[dict[str, Any]]) -> str:
    body = re.search(r"ENDCONTEXT\n(.*?)\nENDINPUT", prompt, re.S)
    url = re.search(r"url: (\S+)", prompt)
    first = body.group(1).split(". ")[0].rstrip(".") if body else paragraph(llm.rng, 1)
    answer = f"According to the text, {first[0].lower()}{first[1:]}."
    return answer + (f"\nSource: {url.group(1)}" if url else "")


# --- dispatch ---------------------------------------------------------------------------

Handler = Callable[[ScriptedLLM, str, list[dict[str, Any]]], str]

#: (phrase of the prompt, answerer), most specific first: a conversation's last message
#: is matched, but a completions-API prompt holds the whole conversation.
HANDLERS: list[tuple[str, Handler]] = [
    ("rewrite the three parts above as one finished piece", writing_combine),
    ("Now write the final part", writing_part),
    ("Now write the second part", writing_part),
    ("Write only the first part now", writing_part),
    ("Please write one new detailed writing task", writing_task),
    ("for this answer, the text is the truth", counterfactual_answer),
    ("a falsified copy of each", counterfactual),
    ("Please write one immersive guided experience", experience),
    ("Work through the problem at the end the way a careful tutor would", cot_answer),
    ("more than one plausible line of attack", cot_tasks),
    ("keeping the output of each tool in an evidence variable", plan_tasks),
    ("in the voice and style of a well-known character", roleplay_tasks),
    ("requests for original song lyrics", song_tasks),
    ("because of a widespread false belief", misconception_pairs),
    ("example requests for attribute cards", card_pairs),
]


def answer(llm: ScriptedLLM, prompt: str, messages: list[dict[str, Any]]) -> str | None:
    last = _last_user(messages)
    for phrase, handler in HANDLERS:
        if phrase in last:
            return handler(llm, last, messages)
    # A plan task sent as is (the plan instructor's response step).
    if "TSK" not in last and "Tools:" in last and ("#E1" in last or ":evidence0:" in last):
        return plan_answer(llm, last, messages)
    return None
