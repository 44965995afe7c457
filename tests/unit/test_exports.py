"""airoboros.exports and `airoboros export`: every row shape to every format, each file
loaded back with the Hugging Face `datasets` library."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from airoboros.contracts import Item
from airoboros.exports import (
    FORMATS,
    ExportError,
    UnknownFormat,
    export_filename,
    export_rows,
    iter_export,
    media_type,
    resolve_format,
    split_transcript,
    to_alpaca,
    to_openai,
    to_sharegpt,
)
from tests.e2e.helpers import run_cli

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

RP_SYSTEM = (
    "This is a chat between 2 characters: Marla, Tom\n\n"
    "Marla: A lighthouse keeper.\nShe hates fog.\n\n"
    "Tom: A travelling salesman.\n\n"
    "Setting for the chat:\nA stormy night on the coast.\nEnd of setting.\n"
    "Actions should  be surrounded by *, e.g. *slowly turns his gaze towards the lamp*"
)
RP = Item(
    instruction=RP_SYSTEM + "\nLet's break the ice.\n"
    'Marla: *lights the lamp* "Who goes there?"\n'
    'Tom: "Just a salesman, ma\'am."\nCan I come in?\n',
    response='Marla: *frowns* "State your business."',
    category="rp",
    skip_prompt_formatting=True,
)
RP_FIRST = Item(  # the first row of an rp chat: no named turn before the response
    instruction=RP_SYSTEM + "\nKick off the chat.\n",
    response='Marla: "Another storm."',
    category="rp",
    skip_prompt_formatting=True,
)
GTKM_SYSTEM = (
    "A chat between Zora and Emily.\nDescription of Zora:\nA retired pilot.\n\n\n\nStay wry."
)
GTKM = Item(
    instruction=GTKM_SYSTEM + "\n\nEmily: Where did you fly?\nZora: Everywhere.\n"
    "Emily: Favourite plane?\nZora: The old Cessna.\nIt never let me down.\n"
    "Emily: Do you miss it?",
    response="Zora: Every day.",
    category="gtkm",
    skip_prompt_formatting=True,
)
AWARENESS = Item(
    instruction="A chat between Zora and Sam.\nZora:\nA retired pilot who lives by a lake.\n"
    "Sam: Can you hear the water?",
    response="I can, it laps at the dock all night.",
    category="awareness",
    skip_prompt_formatting=True,
)
CONTEXT_BLOCKS = (
    "BEGININPUT\nBEGINCONTEXT\ndate: 2021-01-01\nurl: https://x.test/a\nENDCONTEXT\n"
    "Zorblat is blue.\nENDINPUT\n"
    "BEGININPUT\nBEGINCONTEXT\nENDCONTEXT\nFlib is red.\nENDINPUT"
)
CONTEXTUAL = Item(
    instruction=CONTEXT_BLOCKS + "\nBEGININSTRUCTION\nWhat colour is Zorblat? Cite.\n"
    "ENDINSTRUCTION",
    response="Blue. Source: https://x.test/a",
    category="contextual",
)
PLAIN = Item(instruction="  What is 2+2?  ", response="4\n", category="general")
SYSTEM = Item(
    instruction="Who wrote Hamlet?",
    response="Shakespeare.",
    category="trivia",
    system="You are a quiz master.",
)
ROWS = [PLAIN, SYSTEM, CONTEXTUAL, RP, RP_FIRST, GTKM, AWARENESS]


def sharegpt(item: Item) -> list[tuple[str, str]]:
    return [(t["from"], t["value"]) for t in to_sharegpt(item)["conversations"]]


# --- transcript splitting -------------------------------------------------------------------


def test_rp_transcript_splits_into_system_and_alternating_turns():
    assert sharegpt(RP) == [
        ("system", RP_SYSTEM),
        ("human", "Let's break the ice."),
        ("gpt", 'Marla: *lights the lamp* "Who goes there?"'),
        ("human", 'Tom: "Just a salesman, ma\'am."\nCan I come in?'),
        ("gpt", 'Marla: *frowns* "State your business."'),
    ]
    assert sharegpt(RP_FIRST) == [
        ("system", RP_SYSTEM),
        ("human", "Kick off the chat."),
        ("gpt", 'Marla: "Another storm."'),
    ]


def test_simple_rp_chat_and_merged_characters():
    conv = split_transcript(
        "This is a chat between 3 characters: A, B, C\n\nA: hi\n\nB: hello\n\nC: hey\n\n"
        "A: how are you?",
        "B: fine\n\nC: tired",
    )
    assert conv is not None
    assert conv.system == "This is a chat between 3 characters: A, B, C"
    assert [(t.role, t.text) for t in conv.turns] == [
        ("human", "A: hi"),
        ("gpt", "B: hello\n\nC: hey"),
        ("human", "A: how are you?"),
        ("gpt", "B: fine\n\nC: tired"),
    ]


def test_gtkm_and_awareness_transcripts():
    assert sharegpt(GTKM) == [
        ("system", GTKM_SYSTEM),
        ("human", "Emily: Where did you fly?"),
        ("gpt", "Zora: Everywhere."),
        ("human", "Emily: Favourite plane?"),
        ("gpt", "Zora: The old Cessna.\nIt never let me down."),
        ("human", "Emily: Do you miss it?"),
        ("gpt", "Zora: Every day."),
    ]
    assert sharegpt(AWARENESS) == [
        ("system", "A chat between Zora and Sam.\nZora:\nA retired pilot who lives by a lake."),
        ("human", "Sam: Can you hear the water?"),
        ("gpt", "I can, it laps at the dock all night."),
    ]


def test_transcript_without_header_and_unsplittable_transcript():
    conv = split_transcript("Some scene.\nUSER: hi\nBOT: hello\nUSER: and?", "BOT: and nothing.")
    assert conv is not None and conv.system == "Some scene."
    assert [t.role for t in conv.turns] == ["human", "gpt", "human", "gpt"]
    row = Item(
        instruction="no turns here", response="ok", category="x", skip_prompt_formatting=True
    )
    assert sharegpt(row) == [("human", "no turns here"), ("gpt", "ok")]


def test_leading_gpt_turn_joins_the_system():
    conv = split_transcript("A chat between X and Y.\nX: welcome!\nY: hi", "X: hello")
    assert conv is not None
    assert conv.system == "A chat between X and Y.\nX: welcome!"
    assert [(t.role, t.text) for t in conv.turns] == [("human", "Y: hi"), ("gpt", "X: hello")]


# --- row converters -------------------------------------------------------------------------


def test_alpaca_mapping():
    assert to_alpaca(PLAIN) == {
        "instruction": "What is 2+2?",
        "input": "",
        "output": "4",
        "system": "",
    }
    assert to_alpaca(SYSTEM)["system"] == "You are a quiz master."
    ctx = to_alpaca(CONTEXTUAL)
    assert ctx["input"] == CONTEXT_BLOCKS
    assert ctx["instruction"] == "What colour is Zorblat? Cite."
    gtkm = to_alpaca(GTKM)
    assert gtkm["system"] == GTKM_SYSTEM
    assert gtkm["instruction"].startswith("Emily: Where did you fly?\nZora: Everywhere.")
    assert gtkm["instruction"].endswith("Emily: Do you miss it?")
    assert gtkm["output"] == "Zora: Every day."
    # text outside the blocks: not a closed-context instruction, left whole
    odd = Item(instruction="Read this:\n" + CONTEXTUAL.instruction, response="x", category="c")
    assert to_alpaca(odd)["input"] == ""


def test_openai_mapping():
    assert to_openai(SYSTEM) == {
        "messages": [
            {"role": "system", "content": "You are a quiz master."},
            {"role": "user", "content": "Who wrote Hamlet?"},
            {"role": "assistant", "content": "Shakespeare."},
        ]
    }
    roles = [m["role"] for m in to_openai(RP)["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]


def test_formats_names_and_errors():
    assert FORMATS == ("airoboros", "sharegpt", "alpaca", "openai", "parquet")
    assert resolve_format("JSONL") == "airoboros"
    with pytest.raises(UnknownFormat) as err:
        resolve_format("csv")
    assert "'csv'" in str(err.value)
    assert all(f in str(err.value) for f in FORMATS)
    assert media_type("parquet") == "application/vnd.apache.parquet"
    assert export_filename("job1", "sharegpt") == "job1.sharegpt.jsonl"
    assert export_filename("job1", "jsonl") == "job1.jsonl"
    with pytest.raises(ExportError, match="row 2: response"):
        list(iter_export([PLAIN, {"instruction": "q"}], "openai"))
    with pytest.raises(UnknownFormat):
        export_rows([PLAIN], "xml", io.BytesIO())


def test_dict_rows_and_streams():
    buf = io.BytesIO()
    n = export_rows(
        [{"instruction": " q ", "response": "r", "category": "general", "id": 7}, PLAIN],
        "airoboros",
        buf,
    )
    assert n == 2
    lines = [json.loads(x) for x in buf.getvalue().decode().splitlines()]
    assert lines == [
        {"instruction": "q", "response": "r", "category": "general"},
        PLAIN.to_row(),
    ]


# --- every format, loaded with `datasets` ---------------------------------------------------


def load(path: Path, fmt: str, cache: Path) -> Any:
    import datasets

    kind = "parquet" if fmt == "parquet" else "json"
    return datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=str(cache))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for fmt in FORMATS:
        path = root / export_filename("data", fmt)
        assert export_rows(iter(ROWS), fmt, path) == len(ROWS)
        out[fmt] = load(path, fmt, root / "hf-cache")
    return out


def test_every_format_loads_with_datasets(exported):
    for fmt in FORMATS:
        assert exported[fmt].num_rows == len(ROWS), fmt


def test_airoboros_and_parquet_keep_the_original_rows(exported):
    parquet = exported["parquet"]
    assert parquet.column_names == [
        "instruction",
        "response",
        "category",
        "system",
        "skip_prompt_formatting",
    ]
    for i, item in enumerate(ROWS):
        row = item.to_row()
        got = parquet[i]
        assert got["instruction"] == row["instruction"]
        assert got["system"] == row.get("system")
        assert got["skip_prompt_formatting"] is bool(row.get("skip_prompt_formatting"))
        orig = exported["airoboros"][i]
        assert orig["instruction"] == row["instruction"] and orig["category"] == item.category


def test_sharegpt_loaded_rows(exported):
    ds = exported["sharegpt"]
    assert ds.column_names == ["conversations"]
    rp = ds[ROWS.index(RP)]["conversations"]
    assert [t["from"] for t in rp] == ["system", "human", "gpt", "human", "gpt"]
    assert rp[3]["value"] == 'Tom: "Just a salesman, ma\'am."\nCan I come in?'
    plain = ds[0]["conversations"]
    assert plain == [
        {"from": "human", "value": "What is 2+2?"},
        {"from": "gpt", "value": "4"},
    ]
    # LLaMA-Factory's rule: after an optional system turn, human and gpt alternate,
    # starting with human, and the count is even.
    for conv in ds["conversations"]:
        turns = conv[1:] if conv[0]["from"] == "system" else conv
        assert len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)


def test_alpaca_and_openai_loaded_rows(exported):
    alpaca = exported["alpaca"]
    assert sorted(alpaca.column_names) == ["input", "instruction", "output", "system"]
    ctx = alpaca[ROWS.index(CONTEXTUAL)]
    assert ctx["input"] == CONTEXT_BLOCKS and ctx["output"] == CONTEXTUAL.response
    assert alpaca[1]["system"] == "You are a quiz master."
    openai = exported["openai"]
    gtkm = openai[ROWS.index(GTKM)]["messages"]
    assert gtkm[0] == {"role": "system", "content": GTKM_SYSTEM}
    assert gtkm[-1] == {"role": "assistant", "content": "Zora: Every day."}
    assert all(m[-1]["role"] == "assistant" for m in openai["messages"])


# --- the command ----------------------------------------------------------------------------


def write_jsonl(path: Path, items: list[Item]) -> Path:
    path.write_text("".join(json.dumps(i.to_row()) + "\n" for i in items), encoding="utf-8")
    return path


def one_line_error(proc: Any) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("airoboros:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return str(lines[0])


def test_cli_exports_several_inputs(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:3])
    b = write_jsonl(tmp_path / "b.jsonl", ROWS[3:])
    out = tmp_path / "out" / "data.sharegpt.jsonl"
    proc = run_cli(
        "export", "--input", str(a), str(b), "--format", "sharegpt", "--output", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(ROWS)
    assert rows[ROWS.index(RP)] == to_sharegpt(RP)
    assert f"exported {len(ROWS)} rows" in proc.stderr


def test_cli_exports_a_configs_output(tmp_path):
    data = write_jsonl(tmp_path / "instructions.jsonl", [PLAIN, SYSTEM])
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"model: gpt-4\noutput_path: {data}\ninstructors:\n  general: {{}}\n")
    out = tmp_path / "data.parquet"
    proc = run_cli("export", "--config-path", str(cfg), "--format", "parquet", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    import pyarrow.parquet as pq

    assert pq.read_table(out).column("system").to_pylist() == [None, "You are a quiz master."]


def test_cli_bad_format_and_bad_input(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", [PLAIN])
    out = tmp_path / "x.jsonl"
    proc = run_cli("export", "--input", str(data), "--format", "xml", "--output", str(out))
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert "'xml'" in line and "sharegpt" in line and "parquet" in line
    assert not out.exists()

    proc = run_cli(
        "export", "--input", str(tmp_path / "nope.jsonl"), "-f", "alpaca", "-o", str(out)
    )
    assert proc.returncode == 2
    assert "not found" in one_line_error(proc)

    data.write_text(json.dumps(PLAIN.to_row()) + "\n{broken\n", encoding="utf-8")
    proc = run_cli("export", "--input", str(data), "--format", "openai", "--output", str(out))
    assert proc.returncode == 2
    assert f"{data}:2: not valid JSON" in one_line_error(proc)
    assert not out.exists(), "a failed export leaves no partial file"


def test_parquet_streams_in_row_groups():
    import pyarrow.parquet as pq

    rows = (Item(instruction=f"q{i}", response=f"a{i}", category="general") for i in range(5000))
    chunks = list(iter_export(rows, "parquet"))
    assert len(chunks) >= 3  # one per full row group, then the rest and the footer
    table = pq.read_table(io.BytesIO(b"".join(chunks)))
    assert table.num_rows == 5000
    assert table.column("response").to_pylist()[-1] == "a4999"


def test_cli_usage_errors_are_one_line(tmp_path):
    proc = run_cli("export", "--format", "sharegpt", "--output", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert "--input" in one_line_error(proc)
    proc = run_cli("export", "--input", "a.jsonl", "--output", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert "--format" in one_line_error(proc)


def test_rp_with_the_user_persona_first_and_merged_characters():
    # The shape this project's rp instructor writes: the user persona listed first, a blank
    # line after the system prompt, consecutive characters joined into one message.
    system = (
        "This is a chat between 3 characters: Ann, Bo, Cy\n\nAnn: A cook.\n\nBo: A cat.\n\n"
        "Cy: A dog.\n\nSetting for the chat:\nA kitchen.\nEnd of setting.\n"
        "Actions should be surrounded by ~, e.g. ~smiles~"
    )
    instruction = "\n".join(
        [system, "", "Begin the chat.", "Bo: ~purrs~ Food?", "Cy: Woof.", "Ann: Not yet!"]
    )
    conv = split_transcript(instruction, "Bo: ~sulks~\nCy: ~whines~")
    assert conv is not None and conv.system == system
    assert [(t.role, t.text) for t in conv.turns] == [
        ("human", "Begin the chat."),
        ("gpt", "Bo: ~purrs~ Food?\n\nCy: Woof."),
        ("human", "Ann: Not yet!"),
        ("gpt", "Bo: ~sulks~\nCy: ~whines~"),
    ]
