"""Structured output: whether an endpoint honours ``response_format`` json_schema, and
reading the JSON answers it gives.

``structured_output`` in a config is ``auto`` (probe the endpoint once and remember the
verdict per (base_url, model) for the life of the process), ``json_schema`` (always ask
for it; an endpoint that refuses it is an error naming the key) or ``off`` (never ask).
The probe is one tiny chat call ("Say hello.") with a one-field schema: an answer that is
JSON of that shape means supported; a 400/422 answer, or prose (the format was ignored),
means not supported. A transient failure (timeout, 5xx, 429 after the client's retries)
decides nothing: the call at hand uses the markers and the next one probes again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from airoboros.errors import BadRequestError, ConfigError, LLMError

log = logging.getLogger(__name__)

PROBE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}
#: The probe does not ask for JSON in words: a server that ignores response_format then
#: answers in prose, and is judged not to support it.
PROBE_MESSAGES = [{"role": "user", "content": "Say hello."}]

#: (base_url, model) -> supported; shared by every client of the process
_VERDICTS: dict[tuple[str, str], bool] = {}


def json_schema_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """The ``response_format`` of the chat API for ``schema`` (OpenAI's strict form:
    every property required, no additional properties)."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def known_verdict(base_url: str | None, model: str) -> bool | None:
    return _VERDICTS.get((base_url or "", model))


def forget_verdicts() -> None:
    """Drop every remembered verdict (tests; an operator who changed the endpoint)."""
    _VERDICTS.clear()


class StructuredSupport:
    """Decides, per model, whether a client's calls ask for ``response_format``. One per
    LLM client; the verdicts are the process's (``_VERDICTS``)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._locks: dict[str, asyncio.Lock] = {}
        #: probes sent by this client (tests and the progress log read it)
        self.probes = 0

    async def use_structured(self, mode: str, model: str, instructor: str) -> bool:
        """Whether a call of ``instructor`` on ``model`` should ask for a JSON schema.
        Raises ConfigError when ``mode`` is json_schema and the API cannot carry it."""
        if mode == "off":
            return False
        api = self._client.settings.api
        if mode == "json_schema":
            if api != "chat":
                raise ConfigError(
                    [
                        "structured_output: json_schema needs api: chat "
                        "(the completions API has no response_format)"
                    ]
                )
            return True
        if api != "chat":
            return False
        key = (self._client.settings.base_url or "", model)
        if key in _VERDICTS:
            return _VERDICTS[key]
        lock = self._locks.setdefault(model, asyncio.Lock())
        async with lock:  # one probe per model however many calls wait for it
            if key in _VERDICTS:
                return _VERDICTS[key]
            verdict = await self._probe(model, instructor)
            if verdict is not None:
                _VERDICTS[key] = verdict
                log.info(
                    "structured output %s by %s (model %s)",
                    "supported" if verdict else "not supported",
                    key[0] or "the default endpoint",
                    model,
                )
            return bool(verdict)

    def refused(self, model: str) -> None:
        """A call with ``response_format`` was refused after all: remember that the
        endpoint does not support it for ``model``."""
        _VERDICTS[(self._client.settings.base_url or "", model)] = False

    async def _probe(self, model: str, instructor: str) -> bool | None:
        self.probes += 1
        try:
            c = await self._client.complete(
                list(PROBE_MESSAGES),
                model=model,
                instructor=instructor,
                params={
                    "response_format": json_schema_format("probe", PROBE_SCHEMA),
                    "max_tokens": 16,
                    "temperature": 0,
                },
            )
        except BadRequestError as exc:
            # 400/422 and "unsupported response_format" alike: the endpoint refused it. A
            # missing model is not a verdict on the format.
            if exc.code == "model_not_found":
                raise
            return False
        except LLMError:
            return None
        try:
            value = json.loads(c.text)
        except ValueError:
            return False  # the format was ignored
        return isinstance(value, dict) and isinstance(value.get("ok"), bool)


def refused_format(exc: BaseException) -> bool:
    """Whether ``exc`` is an endpoint refusing the response_format it was sent."""
    return isinstance(exc, BadRequestError) and exc.code != "model_not_found"


def parse_json_items(
    text: str, key: str, fields: tuple[str, ...]
) -> tuple[list[tuple[str, ...]], bool]:
    """The items of ``{"<key>": [{field: str, ...}, ...]}`` in ``text``, each as a tuple of
    its ``fields`` (stripped), items with an empty or missing field skipped; and whether
    the JSON was whole. A JSON answer cut off by the token limit keeps the items that were
    complete before the cut (as the marker parsers do with a truncated list); text that
    is not that JSON gives no items."""
    text = text.strip()
    whole = True
    try:
        value: Any = json.loads(text)
        raw = value.get(key) if isinstance(value, dict) else None
    except ValueError:
        whole = False
        raw = _salvage(text, key)
    if not isinstance(raw, list):
        return [], whole
    out: list[tuple[str, ...]] = []
    for item in raw:
        if not isinstance(item, dict):
            continue
        values = tuple(item.get(f) for f in fields)
        if all(isinstance(v, str) and v.strip() for v in values):
            out.append(tuple(str(v).strip() for v in values))
    return out, whole


def _salvage(text: str, key: str) -> list[Any] | None:
    """The complete elements of the array under ``key`` of a JSON object cut short."""
    head = f'"{key}"'
    at = text.find(head)
    if at < 0:
        return None
    at = text.find("[", at + len(head))
    if at < 0:
        return None
    decoder = json.JSONDecoder()
    items: list[Any] = []
    pos = at + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return items
        try:
            item, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return items
        items.append(item)
