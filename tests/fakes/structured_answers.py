"""JSON answers of the scripted server for requests with ``response_format``.

An item-list schema (``{KEY: [{field: string, ...}]}``) is answered with the items the
server would have written in the marker format that the field names stand for (``tasks``
with ``instruction``: a TSK list; ``question``/``answer`` or ``prompt``/``answer``: pairs),
converted to JSON, so structured and marker runs see the same kind of content. Any other
schema gets a value built from the schema itself (strings, booleans, numbers, arrays of one
element). ``json_object`` gets ``{"text": ...}``. Every answer is checked against the
requested schema with jsonschema before it is sent.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import jsonschema

if TYPE_CHECKING:
    from tests.fakes.llm_server import ScriptedLLM

_TSK = re.compile(r"TSK \d+\. (.*)")


def structured_answer(
    llm: ScriptedLLM, prompt: str, messages: list[dict[str, Any]] | None, fmt: dict[str, Any]
) -> str:
    if fmt.get("type") == "json_object":
        return json.dumps({"text": llm.answer(prompt, messages)})
    schema = (fmt.get("json_schema") or {}).get("schema") or {}
    value = _items(llm, prompt, messages, schema)
    if value is None:
        value = _from_schema(schema, llm)
    jsonschema.validate(value, schema)
    return json.dumps(value, ensure_ascii=False)


def _items(
    llm: ScriptedLLM, prompt: str, messages: list[dict[str, Any]] | None, schema: dict[str, Any]
) -> dict[str, Any] | None:
    props = schema.get("properties") or {}
    if len(props) != 1:
        return None
    key, array = next(iter(props.items()))
    fields = list(((array.get("items") or {}).get("properties") or {}).keys())
    if array.get("type") != "array" or not fields:
        return None
    if fields == ["instruction"]:
        text = llm.answer(prompt + "\nTSK", messages)
        return {key: [{"instruction": t.strip()} for t in _TSK.findall(text)]}
    if fields == ["fact", "counter", "question"]:
        # counterfactual_contextual: three numbered sections, item n of each together.
        text = llm.answer(prompt, messages)
        sections = re.split(r"(?m)^(?:FACTS|COUNTER|QUESTIONS):\s*$", text)[1:]
        lists = [re.findall(r"(?m)^\d+\. (.*)$", sec) for sec in sections]
        if len(lists) != 3:
            return {key: []}
        return {key: [dict(zip(fields, t, strict=True)) for t in zip(*lists, strict=False)]}
    if fields == ["name", "description", "guide"]:
        # character cards: the NAME: line of each DESCRIPTION becomes "name".
        text = llm.answer(prompt + "\nDESCRIPTION:\nGUIDE:", messages)
        cards = []
        for desc, guide in re.findall(
            r"DESCRIPTION:\s*(.*?)\s*GUIDE:\s*(.*?)\s*(?=DESCRIPTION:|\Z)", text, re.S
        ):
            name = re.search(r"NAME:\s*(.+)", desc)
            rest = re.sub(r"NAME:\s*.+\n?", "", desc, count=1).strip()
            if name:
                cards.append({"name": name.group(1).strip(), "description": rest, "guide": guide})
        return {key: cards}
    # Fields named after markers: the marker answer (asked for by naming the markers),
    # one item per block that starts with the first marker.
    marks = [f.upper() for f in fields]
    text = llm.answer(prompt + "\n" + "\n".join(f"{m}:" for m in marks), messages)
    split = re.compile(rf"(?m)^\s*({'|'.join(marks)}):[ \t]*")
    pieces = split.split(text)
    items: list[dict[str, str]] = []
    for i in range(1, len(pieces) - 1, 2):
        mark, value = pieces[i], pieces[i + 1].strip()
        if mark == marks[0]:
            items.append({})
        if items and fields[marks.index(mark)] not in items[-1]:
            items[-1][fields[marks.index(mark)]] = value
    return {key: [i for i in items if len(i) == len(fields)]}


def _from_schema(schema: dict[str, Any], llm: ScriptedLLM) -> Any:
    kind = schema.get("type")
    if kind == "object":
        return {k: _from_schema(v, llm) for k, v in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [_from_schema(schema.get("items") or {"type": "string"}, llm)]
    if kind == "boolean":
        return True
    if kind in ("integer", "number"):
        return 1
    if "enum" in schema:
        return schema["enum"][0]
    return "ok"
