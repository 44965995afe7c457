"""Routing samples for clearly separated experts (code, cooking, astronomy, law, music,
fitness), for the router's tests and bench/router_bench.py.

Each expert has "train" templates (its routing samples) and "held-out" templates (the
queries of an evaluation), filled from the expert's own vocabulary with a seeded RNG, so the
held-out queries share the topic of the samples but never their wording. Samples carry the
system prompt in front, as the trainer writes them (``"A chat. <instruction>"``).
"""

from __future__ import annotations

import random

DOMAINS: dict[str, dict[str, list[str]]] = {
    "code": {
        "a": ["Python", "Rust", "Go", "TypeScript", "Java", "C++", "Kotlin", "SQL"],
        "b": [
            "a linked list",
            "a binary search tree",
            "an LRU cache",
            "a JSON parser",
            "a rate limiter",
            "a thread pool",
            "a trie",
            "a priority queue",
            "a REST client",
            "a CSV reader",
        ],
        "train": [
            "Write a {a} function that implements {b}.",
            "How do I unit test {b} written in {a}?",
            "Refactor this {a} code for {b} so it compiles without warnings.",
            "Explain the time complexity of {b} and show an implementation in {a}.",
            "My {a} program crashes with a null pointer in {b}; how do I debug it?",
            "Implement {b} in {a} with generics and error handling.",
        ],
        "held": [
            "Give me {a} source code for {b}, with comments.",
            "What is the idiomatic way to write {b} in {a}?",
        ],
    },
    "cooking": {
        "a": [
            "risotto",
            "sourdough bread",
            "lasagna",
            "pad thai",
            "chocolate cake",
            "beef stew",
            "ramen",
            "paella",
            "pancakes",
            "curry",
        ],
        "b": [
            "garlic",
            "butter",
            "saffron",
            "fresh basil",
            "brown sugar",
            "coconut milk",
            "shallots",
            "parmesan",
        ],
        "train": [
            "Give me a recipe for {a} that uses {b}.",
            "How long should I bake {a} and at what oven temperature?",
            "What can I substitute for {b} when making {a}?",
            "My {a} always turns out bland; how do I season it with {b}?",
            "How do I make {a} ahead of time for a dinner party?",
            "List the ingredients for a vegetarian {a} with {b}.",
        ],
        "held": [
            "Which side dishes go well with {a}, and should I add {b}?",
            "Walk me through cooking {a} step by step in my kitchen.",
        ],
    },
    "astronomy": {
        "a": [
            "Jupiter",
            "the Andromeda galaxy",
            "a neutron star",
            "Saturn's rings",
            "a black hole",
            "the Orion nebula",
            "a red dwarf",
            "the Moon",
            "Mars",
            "a quasar",
        ],
        "b": [
            "a backyard telescope",
            "binoculars",
            "the Hubble telescope",
            "radio telescopes",
            "spectroscopy",
            "gravitational lensing",
        ],
        "train": [
            "How far away is {a}, and how was that measured?",
            "Can I observe {a} with {b} tonight?",
            "Explain how {a} formed, in simple terms.",
            "What did astronomers learn about {a} using {b}?",
            "Why does {a} look the way it does in the night sky?",
            "Describe the orbit and mass of {a}.",
        ],
        "held": [
            "What is the best season to see {a} through {b}?",
            "Tell me three surprising facts about {a} for a stargazing club.",
        ],
    },
    "law": {
        "a": [
            "a tenancy agreement",
            "an employment contract",
            "a non-disclosure agreement",
            "a will",
            "a patent",
            "a divorce settlement",
            "a trademark",
            "a small claims case",
        ],
        "b": [
            "a landlord",
            "an employer",
            "a court",
            "a solicitor",
            "a notary",
            "the other party",
        ],
        "train": [
            "Is {a} legally binding if {b} never signed it?",
            "What are my rights under {a} when {b} breaks its terms?",
            "How do I challenge {a} in court?",
            "Draft a clause for {a} that limits liability.",
            "What happens legally if {b} ignores {a}?",
            "Explain the statute of limitations for disputes over {a}.",
        ],
        "held": [
            "Can {b} enforce {a} against me, and what defences do I have?",
            "Which legal documents do I need to file regarding {a}?",
        ],
    },
    "music": {
        "a": [
            "the guitar",
            "the piano",
            "the violin",
            "jazz improvisation",
            "a pop song",
            "a string quartet",
            "the drums",
            "a symphony",
        ],
        "b": [
            "minor chords",
            "syncopated rhythm",
            "a major scale",
            "a chord progression",
            "counterpoint",
            "vibrato",
        ],
        "train": [
            "How do I practise {b} on {a}?",
            "Compose a melody for {a} using {b}.",
            "Explain the music theory behind {b} in {a}.",
            "Which famous pieces for {a} use {b}?",
            "How do I tune and warm up before playing {a}?",
            "Write chord charts for {a} built on {b}.",
        ],
        "held": [
            "Give me a weekly practice plan to master {b} on {a}.",
            "Why does {b} sound sad or tense when played on {a}?",
        ],
    },
    "fitness": {
        "a": [
            "squats",
            "deadlifts",
            "interval running",
            "push-ups",
            "yoga",
            "swimming laps",
            "cycling",
            "kettlebell swings",
        ],
        "b": [
            "build muscle",
            "lose fat",
            "improve endurance",
            "recover from a knee injury",
            "train for a marathon",
            "increase flexibility",
        ],
        "train": [
            "How many sets of {a} should I do to {b}?",
            "Design a four-week workout plan with {a} to {b}.",
            "What is the correct form for {a}?",
            "Is {a} enough cardio to {b}?",
            "How much protein should I eat to {b} while doing {a}?",
            "How often should I rest between sessions of {a}?",
        ],
        "held": [
            "Create a gym routine around {a} for someone who wants to {b}.",
            "Which muscles does {a} work, and will it help me {b}?",
        ],
    },
}

SYSTEM = "A chat."


def _fill(
    templates: list[str], vocab: dict[str, list[str]], n: int, rng: random.Random
) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n and tries < n * 50:
        tries += 1
        text = rng.choice(templates).format(a=rng.choice(vocab["a"]), b=rng.choice(vocab["b"]))
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def samples(expert: str, n: int = 40, *, seed: int = 7, system: str = SYSTEM) -> list[str]:
    """``n`` routing samples of ``expert`` (``"<system> <instruction>"``)."""
    d = DOMAINS[expert]
    rng = random.Random(f"{seed}:{expert}:train")
    return [f"{system} {t}" for t in _fill(d["train"], d, n, rng)]


def held_out(expert: str, n: int = 20, *, seed: int = 7) -> list[str]:
    """``n`` queries in ``expert``'s topic, worded unlike its samples (no system prompt)."""
    d = DOMAINS[expert]
    rng = random.Random(f"{seed}:{expert}:held")
    return _fill(d["held"], d, n, rng)
