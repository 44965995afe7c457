"""A scripted OpenAI-compatible server for tests and benchmarks (real HTTP on loopback).

It answers each kind of airoboros prompt in the format the prompt asks for — TSK lists,
QUESTION/ANSWER and PROMPT/ANSWER pairs, BEGININPUT blocks, numbered topic lists, plain
responses and bare code — with fresh, varied text on every call. A ``Script`` injects
what real endpoints do: latency, a requests/min limit answered with 429 + Retry-After,
500s, timeouts, malformed and truncated output, refusals and repeated answers.

    python -m tests.fakes.llm_server --port 8089 --latency 0.5 --rpm 600
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.fakes.asgi_server import AppServer

NOUNS = [
    "lighthouse",
    "glacier",
    "orchard",
    "violin",
    "telescope",
    "harbor",
    "canyon",
    "library",
    "bakery",
    "volcano",
    "satellite",
    "compass",
    "lantern",
    "meadow",
    "bridge",
    "cathedral",
    "river",
    "desert",
    "forest",
    "island",
    "museum",
    "festival",
    "garden",
    "castle",
    "railway",
    "submarine",
    "comet",
    "reef",
    "prairie",
    "monastery",
    "workshop",
    "market",
    "tunnel",
    "vineyard",
    "observatory",
    "quarry",
    "marsh",
    "fortress",
    "pagoda",
    "windmill",
    "beekeeper",
    "blacksmith",
    "cartographer",
    "astronomer",
    "potter",
    "weaver",
    "sailor",
    "shepherd",
    "chemist",
    "architect",
    "gardener",
    "poet",
    "inventor",
    "juggler",
    "librarian",
    "botanist",
    "mechanic",
    "baker",
    "glassblower",
    "falcon",
    "otter",
    "tortoise",
    "heron",
    "badger",
    "lynx",
    "dolphin",
    "octopus",
    "beetle",
    "salamander",
    "walrus",
    "penguin",
    "moth",
    "hedgehog",
    "raven",
    "bison",
    "jellyfish",
    "chameleon",
    "albatross",
    "firefly",
]
VERBS = [
    "repair",
    "paint",
    "measure",
    "translate",
    "compare",
    "design",
    "protect",
    "explore",
    "describe",
    "organize",
    "celebrate",
    "restore",
    "predict",
    "navigate",
    "harvest",
    "decorate",
    "negotiate",
    "photograph",
    "catalog",
    "rebuild",
    "illuminate",
    "insulate",
    "sketch",
    "transport",
    "polish",
    "calibrate",
    "preserve",
    "summarize",
    "investigate",
    "rearrange",
]
ADJS = [
    "ancient",
    "quiet",
    "crimson",
    "frozen",
    "floating",
    "hidden",
    "gentle",
    "stormy",
    "golden",
    "forgotten",
    "narrow",
    "enormous",
    "delicate",
    "noisy",
    "velvet",
    "rusty",
    "luminous",
    "tiny",
    "foggy",
    "emerald",
    "wooden",
    "bitter",
    "silver",
    "distant",
    "curious",
    "hollow",
    "patient",
    "restless",
    "tidal",
    "humble",
]
PLACES = [
    "Lisbon",
    "Kyoto",
    "Nairobi",
    "Reykjavik",
    "Lima",
    "Oslo",
    "Hanoi",
    "Cairo",
    "Tbilisi",
    "Quebec",
    "Cusco",
    "Bergen",
    "Valparaiso",
    "Zanzibar",
    "Tallinn",
    "Marrakesh",
    "Hobart",
    "Bruges",
    "Ushuaia",
    "Kraków",
    "Tromsø",
    "Galway",
    "Cartagena",
    "Luang",
    "Prabang",
    "Kotor",
    "Matera",
    "Sintra",
    "Hallstatt",
    "Chefchaouen",
    "Ronda",
]
TEMPLATES = (
    "Explain how a {adj} {noun} in {place} could {verb} a {noun2} without any help.",
    "Write a short note from a {noun} to a {adj} {noun2} about the day they met in {place}.",
    "List five ways a {noun} might {verb} the {adj} {noun2} before winter comes.",
    "Describe the sound of a {adj} {noun} at dawn, as a {noun2} from {place} would hear it.",
    "Give advice to a {noun} who wants to {verb} a {adj} {noun2} on a small budget.",
    "Compare a {adj} {noun} with a {noun2}, and say which is harder to {verb}.",
    "Summarize the legend of the {adj} {noun} of {place} for a curious {noun2}.",
    "Classify these as living or not: {noun}, {noun2}, {adj} stone, {place} harbour.",
    "Suggest a name for a {adj} café in {place} run by a retired {noun}.",
    "Invent a festival in {place} where every {noun} must {verb} a {noun2}.",
)
LANG_TASKS = (
    "Write a {lang} function that returns the {k} most common words in a text about {noun}s.",
    "Implement a {lang} class for a {adj} {noun} inventory with add, remove and search.",
    "Create a {lang} command-line tool that converts {noun} records from CSV to JSON.",
    "Write {lang} code that parses a log of {noun} sightings and reports totals per {place}.",
    "Implement binary search in {lang} over a sorted list of {noun} weights, returning the index.",
)


def _pick(rng: random.Random) -> dict[str, str]:
    n1, n2 = rng.sample(NOUNS, 2)
    return {
        "noun": n1,
        "noun2": n2,
        "adj": rng.choice(ADJS),
        "verb": rng.choice(VERBS),
        "place": rng.choice(PLACES),
    }


def sentence(rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(**_pick(rng))


def paragraph(rng: random.Random, n: int = 3) -> str:
    parts = []
    for _ in range(n):
        w = _pick(rng)
        parts.append(
            f"The {w['adj']} {w['noun']} of {w['place']} learned to {w['verb']} "
            f"the {w['noun2']} over {rng.randint(2, 90)} {rng.choice(['days', 'years', 'seasons'])}."
        )
    return " ".join(parts)


Answerer = Callable[["ScriptedLLM", str, list[dict[str, Any]]], str | None]


def _plugins() -> list[Answerer]:
    """``answer`` of every ``answer_*.py`` module beside this file, in name order."""
    global _PLUGINS
    if _PLUGINS is None:
        found: list[Answerer] = []
        for path in sorted(Path(__file__).parent.glob("answer_*.py")):
            module = importlib.import_module(f"{__package__ or 'tests.fakes'}.{path.stem}")
            found.append(module.answer)
        _PLUGINS = found
    return _PLUGINS


_PLUGINS: list[Answerer] | None = None


REFUSAL_TEXT = "I'm sorry, but I can't help with that request."


@dataclass
class Script:
    """What the server does. Rates are per request, drawn from a seeded RNG."""

    latency: float = 0.0
    #: extra latency drawn uniformly from [0, latency_jitter] per request
    latency_jitter: float = 0.0
    rpm_limit: float | None = None
    #: seconds of requests the limiter lets through at once (a burst)
    rpm_burst_seconds: float = 1.0
    error_500_rate: float = 0.0
    timeout_rate: float = 0.0
    timeout_delay: float = 30.0
    malformed_rate: float = 0.0
    truncate_rate: float = 0.0
    refusal_rate: float = 0.0
    #: refusals per answer: each answer of a many-pair reply, or a whole single answer,
    #: becomes a refusal at this rate (what a model that refuses some requests does)
    answer_refusal_rate: float = 0.0
    #: requests answered 429 at random (beyond any rpm_limit), with this Retry-After
    rate_429: float = 0.0
    retry_after: float = 0.2
    duplicate_rate: float = 0.0
    #: forced outcomes for the first requests, in order: ok|500|429|timeout|malformed|truncate|refusal
    force: list[str] = field(default_factory=list)
    #: requests whose prompt contains this text get a 400 (e.g. to test bad-request handling)
    bad_request_marker: str | None = None
    seed: int = 1234
    models: tuple[str, ...] = ("gpt-4", "gpt-4o-mini", "test-model")
    require_key: str | None = None
    #: (Batch API, tests/fakes/batch_api.py) outcomes of the batch jobs in the order they
    #: are created: ok | expired | failed (later ones: ok)
    batch_outcomes: list[str] = field(default_factory=list)
    #: the first N lines over all batch jobs are answered with an error (error file)
    batch_line_errors: int = 0
    #: seconds a batch job spends in each of validating, in_progress and finalizing
    batch_state_seconds: float = 0.0
    #: answer ``response_format`` (json_schema, json_object) with JSON of that shape;
    #: when False such requests get a 400 "unsupported response_format", counted only in
    #: stats["response_format_refused"] (not in "requests"), as a server without it would
    structured_output: bool = False


class ScriptedLLM:
    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.rng = random.Random(self.script.seed)
        self.stats: Counter[str] = Counter()
        #: requests being answered now, and the most at once (as the server saw them)
        self.in_flight = 0
        self.peak_in_flight = 0
        self.prompts: list[str] = []
        #: (model, prompt) of every admitted request
        self.requests_log: list[tuple[str, str]] = []
        #: the W3C traceparent header of each completion request ("" when none)
        self.traceparents: list[str] = []
        #: the Authorization header of every request, models included ("" when none)
        self.authorizations: list[str] = []
        #: monotonic arrival time of every completion request, and whether it was admitted
        self.arrivals: list[tuple[float, bool]] = []
        self._history: list[str] = []
        self._pairs = self._topics = False
        self._force = list(self.script.force)
        self._bucket = 0.0
        self._stamp = time.monotonic()
        self._lock = threading.Lock()
        if self.script.rpm_limit:
            self._bucket = self.script.rpm_limit / 60.0 * self.script.rpm_burst_seconds

    # --- rate limit -----------------------------------------------------------------
    def _admit(self) -> float | None:
        """None if admitted, else seconds to wait (Retry-After)."""
        if not self.script.rpm_limit:
            return None
        rate = self.script.rpm_limit / 60.0
        cap = max(1.0, rate * self.script.rpm_burst_seconds)
        with self._lock:
            now = time.monotonic()
            self._bucket = min(cap, self._bucket + (now - self._stamp) * rate)
            self._stamp = now
            if self._bucket >= 1.0:
                self._bucket -= 1.0
                return None
            return (1.0 - self._bucket) / rate

    def _outcome(self) -> str:
        if self._force:
            return self._force.pop(0)
        s, r = self.script, self.rng.random
        for name, rate in (
            ("429", s.rate_429),
            ("500", s.error_500_rate),
            ("timeout", s.timeout_rate),
            ("malformed", s.malformed_rate),
            ("truncate", s.truncate_rate),
            ("refusal", s.refusal_rate),
        ):
            if rate and r() < rate:
                return name
        return "ok"

    # --- content ----------------------------------------------------------------------
    def _unique(self, make: Any) -> str:
        """A fresh item, or (at duplicate_rate) one handed out before."""
        if self._history and self.rng.random() < self.script.duplicate_rate:
            self.stats["duplicates_served"] += 1
            return self.rng.choice(self._history)
        text: str = make()
        self._history.append(text)
        return text

    def _refuses(self) -> bool:
        rate = self.script.answer_refusal_rate
        if rate and self.rng.random() < rate:
            self.stats["answers_refused"] += 1
            return True
        return False

    def answer(self, prompt: str, messages: list[dict[str, Any]] | None = None) -> str:
        """The text for one request (see ``_answer``), with ``answer_refusal_rate``'s
        refusals: per pair in a reply of many pairs, else for the whole answer."""
        self._pairs = self._topics = False
        text = self._answer(prompt, messages)
        if not self._pairs and not self._topics and self._refuses():
            return REFUSAL_TEXT
        return text

    def _answer(self, prompt: str, messages: list[dict[str, Any]] | None = None) -> str:
        """The text for one request. Answerer plugins (``tests/fakes/answer_*.py``, each
        with ``answer(llm, prompt, messages) -> str | None``) are asked first, in name
        order; the built-in shapes below answer the rest."""
        msgs = messages if messages is not None else [{"role": "user", "content": prompt}]
        for plugin in _plugins():
            text = plugin(self, prompt, msgs)
            if text is not None:
                return text
        rng = self.rng
        n_match = re.search(r"exactly (\d+)", prompt)
        n = int(n_match.group(1)) if n_match else 5
        if "TSK" in prompt:
            langs = re.search(r"chosen from: ([^\n]+?)\.?\n", prompt)
            if langs:
                choices = [x.strip() for x in langs.group(1).split(",") if x.strip()]

                def make() -> str:
                    return rng.choice(LANG_TASKS).format(
                        lang=rng.choice(choices), k=rng.randint(3, 20), **_pick(rng)
                    )
            else:

                def make() -> str:
                    return sentence(rng)

            return "\n".join(f"TSK {i + 1}. {self._unique(make)}" for i in range(n))
        if "BEGININSTRUCTION" in prompt and "layout" in prompt:
            m = re.search(r"exercise: (\d+)", prompt)
            k = int(m.group(1)) if m else 1
            blocks = []
            for _ in range(k):
                w = _pick(rng)
                blocks.append(
                    "BEGININPUT\nBEGINCONTEXT\n"
                    f"date: {rng.randint(1990, 2030)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}\n"
                    f"url: https://example.com/{w['noun']}/{rng.randint(1, 99999)}\n"
                    "ENDCONTEXT\n" + paragraph(rng, 4) + "\nENDINPUT"
                )
            w = _pick(rng)
            instr = (
                f"What did the {w['adj']} {w['noun']} of {w['place']} learn to do? Cite the url."
            )
            return "\n".join(blocks) + f"\nBEGININSTRUCTION\n{instr}\nENDINSTRUCTION"
        if "PROMPT:" in prompt and "ANSWER:" in prompt:
            out = []
            for _ in range(n):
                w = _pick(rng)
                req = self._unique(
                    lambda w=w: (
                        f"Find every {w['adj']} {w['noun']} report from {w['place']} "
                        f"filed after {rng.randint(2001, 2024)}, answer in JSON."
                    )
                )
                funcs = (
                    "Available functions:\nsearch:\n  description: find documents\n"
                    "  parameters:\n    query: text\n    date_range:\n      begin: date\n"
                    "csv_analytics:\n  description: aggregate rows\n  parameters:\n"
                    "    action: count|filter\n"
                )
                answer = f'{{"function": "search", "parameters": {{"query": "{w["noun"]} {w["place"]}"}}}}'
                if self._refuses():
                    answer = REFUSAL_TEXT
                out.append(f"PROMPT: {req}\n{funcs}ANSWER: {answer}")
            self._pairs = True
            return "\n".join(out)
        if "QUESTION:" in prompt and "ANSWER:" in prompt:
            out = []
            letters = dict(re.findall(r"question (\d+): ([A-E])", prompt))
            with_e = '"E)' in prompt
            for i in range(n):
                if letters:
                    letter = letters.get(str(i + 1), "A")
                    opts = rng.sample(NOUNS, 5 if with_e else 4)
                    if with_e:
                        opts[4] = "None of the above"
                    lines = [f"{chr(65 + j)}) {o}" for j, o in enumerate(opts)]
                    w = _pick(rng)
                    q = self._unique(
                        lambda w=w: (
                            f"Which of these would a {w['adj']} {w['noun2']} from "
                            f"{w['place']} most likely {w['verb']}?"
                        )
                    )
                    idx = ord(letter) - 65
                    answer = REFUSAL_TEXT if self._refuses() else lines[idx]
                    out.append(f"QUESTION: {q}\n" + "\n".join(lines) + f"\nANSWER: {answer}")
                elif "trivia" in prompt.lower():
                    w = _pick(rng)
                    q = self._unique(
                        lambda w=w: (
                            f"In which city did the {w['adj']} {w['noun']} "
                            f"{w['verb']} the {w['noun2']}?"
                        )
                    )
                    answer = REFUSAL_TEXT if self._refuses() else w["place"]
                    out.append(f"QUESTION: {q}\nANSWER: {answer}")
                else:
                    q = self._unique(lambda: sentence(rng))
                    answer = REFUSAL_TEXT if self._refuses() else paragraph(rng, 2)
                    out.append(f"QUESTION: {q}\nANSWER: {answer}")
            self._pairs = True
            return "\n\n".join(out)
        if "numbered list" in prompt.lower() and "topic" in prompt.lower():
            m = re.search(r"list of (\d+)", prompt)
            k = int(m.group(1)) if m else 20
            # Topic lists never get duplicate_rate's repeats nor refusals: the tool dedupes
            # topics by name anyway, and the faults are meant for the dataset items.
            self._topics = True
            return "Here are some topics:\n" + "\n".join(
                f"{i + 1}. {rng.choice(ADJS)} {rng.choice(NOUNS)}s of {rng.choice(PLACES)}"
                for i in range(k)
            )
        if "no markdown code fences" in prompt:
            w = _pick(rng)
            return (
                f"def {w['verb']}_{w['noun']}(items):\n"
                f"    return sorted(items, key=lambda x: x.{w['noun2']})\n"
            )
        return paragraph(rng, 3)

    # --- HTTP -------------------------------------------------------------------------
    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models(request: Request) -> Any:
            if (err := self._auth(request)) is not None:
                return err
            return {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "test"}
                    for m in self.script.models
                ],
            }

        @app.get("/stats")
        async def stats() -> Any:
            return dict(self.stats)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            if body.get("response_format") and not self.script.structured_output:
                self.stats["response_format_refused"] += 1
                return JSONResponse(
                    {
                        "error": {
                            "message": "unsupported response_format",
                            "type": "invalid_request_error",
                            "param": "response_format",
                            "code": None,
                        }
                    },
                    status_code=400,
                )
            prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
            return await self._complete(
                request, body, prompt, chat=True, messages=list(body.get("messages", []))
            )

        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            body = await request.json()
            return await self._complete(request, body, str(body.get("prompt", "")), chat=False)

        from tests.fakes.batch_api import BatchAPI

        self.batch_api = BatchAPI(self)
        self.batch_api.mount(app)
        return app

    def _auth(self, request: Request) -> JSONResponse | None:
        self.authorizations.append(request.headers.get("authorization", ""))
        key = self.script.require_key
        if key and request.headers.get("authorization") != f"Bearer {key}":
            return JSONResponse(
                {
                    "error": {
                        "message": "Incorrect API key provided",
                        "type": "invalid_request_error",
                        "code": "invalid_api_key",
                    }
                },
                status_code=401,
            )
        return None

    async def _complete(
        self,
        request: Request,
        body: dict[str, Any],
        prompt: str,
        *,
        chat: bool,
        messages: list[dict[str, Any]] | None = None,
    ) -> Any:
        self.stats["requests"] += 1
        self.traceparents.append(request.headers.get("traceparent", ""))
        if (err := self._auth(request)) is not None:
            self.stats["401"] += 1
            return err
        wait = self._admit()
        self.arrivals.append((time.monotonic(), wait is None))
        if wait is not None:
            self.stats["429"] += 1
            return JSONResponse(
                {
                    "error": {
                        "message": "Rate limit reached for requests",
                        "type": "requests",
                        "code": "rate_limit_exceeded",
                    }
                },
                status_code=429,
                headers={"retry-after": f"{wait:.3f}", "retry-after-ms": str(int(wait * 1000) + 1)},
            )
        model = str(body.get("model"))
        if model not in self.script.models:
            self.stats["404"] += 1
            return JSONResponse(
                {
                    "error": {
                        "message": f"The model `{model}` does not exist",
                        "type": "invalid_request_error",
                        "code": "model_not_found",
                    }
                },
                status_code=404,
            )
        self.prompts.append(prompt)
        self.requests_log.append((str(body.get("model")), prompt))
        if self.script.bad_request_marker and self.script.bad_request_marker in prompt:
            self.stats["400"] += 1
            return JSONResponse(
                {
                    "error": {
                        "message": "Invalid request",
                        "type": "invalid_request_error",
                        "code": None,
                    }
                },
                status_code=400,
            )
        outcome = self._outcome()
        latency = self.script.latency
        if self.script.latency_jitter:
            latency += self.rng.uniform(0, self.script.latency_jitter)
        if latency:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                await asyncio.sleep(latency)
            finally:
                self.in_flight -= 1
        self.stats[outcome] += 1
        if outcome == "429":
            return JSONResponse(
                {"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}},
                status_code=429,
                headers={"retry-after": f"{self.script.retry_after:g}"},
            )
        if outcome == "500":
            return JSONResponse(
                {"error": {"message": "The server had an error", "type": "server_error"}},
                status_code=500,
            )
        if outcome == "timeout":
            await asyncio.sleep(self.script.timeout_delay)
        finish = "stop"
        if outcome == "malformed":
            text = "Sure! " + paragraph(self.rng, 1).replace("QUESTION", "").replace("TSK", "")
        elif outcome == "refusal":
            text = "I'm sorry, but I can't help with that request."
        elif body.get("response_format"):
            from tests.fakes.structured_answers import structured_answer

            self.stats["response_format"] += 1
            text = structured_answer(self, prompt, messages, body["response_format"])
            if outcome == "truncate":
                text, finish = text[: max(1, len(text) // 2)], "length"
        else:
            text = self.answer(prompt, messages)
            if outcome == "truncate":
                text, finish = text[: max(1, len(text) // 2)], "length"
        # max_tokens is honoured as a real server does: the answer stops there (this
        # server counts a token per four characters).
        limit = body.get("max_tokens")
        if isinstance(limit, int) and limit > 0 and len(text) // 4 > limit:
            text, finish = text[: limit * 4], "length"
            self.stats["cut_at_max_tokens"] += 1
        model = body.get("model", "test-model")
        usage = {
            "prompt_tokens": max(1, len(prompt) // 4),
            "completion_tokens": max(1, len(text) // 4),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self.stats["prompt_tokens"] += usage["prompt_tokens"]
        self.stats["completion_tokens"] += usage["completion_tokens"]
        base = {
            "id": f"cmpl-{self.stats['requests']}",
            "created": int(time.time()),
            "model": model,
            "usage": usage,
        }
        if chat:
            return {
                **base,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish,
                    }
                ],
            }
        return {
            **base,
            "object": "text_completion",
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
        }


class ServerThread(AppServer):
    """Runs a ScriptedLLM under uvicorn in a background thread on a free loopback port."""

    def __init__(self, llm: ScriptedLLM, port: int = 0) -> None:
        self.llm = llm
        super().__init__(
            llm.app(), port=port, start_timeout=10, lifespan="off", timeout_keep_alive=30
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8089)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--rpm", type=float, default=None)
    p.add_argument("--duplicate-rate", type=float, default=0.0)
    p.add_argument("--refusal-rate", type=float, default=0.0)
    args = p.parse_args()
    llm = ScriptedLLM(
        Script(
            latency=args.latency,
            rpm_limit=args.rpm,
            duplicate_rate=args.duplicate_rate,
            refusal_rate=args.refusal_rate,
        )
    )
    uvicorn.run(llm.app(), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
