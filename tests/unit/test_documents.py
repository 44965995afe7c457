"""The documents instructor: splitting, passage hand-out, parsing, grounding, a run."""

from __future__ import annotations

import importlib.util
import os
import random
import re
from pathlib import Path
from typing import Any

import pytest

from airoboros.cli.embedded import Generation
from airoboros.config import Config, load_config, parse_config
from airoboros.contracts import BatchStats, GenerateBatch
from airoboros.documents import DocumentsError, load_passages, split_document, split_sentences
from airoboros.errors import ConfigError
from airoboros.generator.instructors.base import Ctx
from airoboros.generator.instructors.contextual import valid_block
from airoboros.generator.instructors.documents import (
    QA,
    Documents,
    grounding_problem,
    normalize,
    parse_qa,
)
from airoboros.store import SqlStore
from airoboros.topics.controller import StoreSources
from airoboros.topics.inputs import batch_inputs
from tests.e2e.helpers import read_rows, write_config
from tests.fakes.answer_documents import GROUNDED_PREFIX

WORDS = [
    "harbour", "breakwater", "granite", "tide", "pilot", "ledger", "lantern", "quay",
    "dredger", "keel", "anchor", "winch", "gull", "mooring", "ferry", "beacon",
    "warehouse", "crane", "barge", "tug",
]  # fmt: skip


def para(seed: int, sentences: int = 4, words: int = 12) -> str:
    """A paragraph of ``sentences`` sentences of ``words`` words, distinct per seed."""
    rng = random.Random(seed)
    out = []
    for i in range(sentences):
        body = " ".join(rng.choice(WORDS) for _ in range(words - 2))
        out.append(f"Record{seed}x{i} {body} ends.")
    return " ".join(out)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def make_pdf(path: Path, pages: list[list[str]], title: str | None = None) -> None:
    """A small PDF with one text line per entry, drawn with Helvetica (pypdf only)."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    font = DictionaryObject(
        {
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica"),
        }
    )
    font_ref = writer._add_object(font)
    for lines in pages:
        page = writer.add_blank_page(width=612, height=792)
        ops = ["BT", "/F1 11 Tf", "14 TL", "40 750 Td"]
        for line in lines:
            escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            ops.append(f"({escaped}) Tj T*")
        ops.append("ET")
        stream = DecodedStreamObject()
        stream.set_data("\n".join(ops).encode("latin-1"))
        page[NameObject("/Contents")] = writer._add_object(stream)
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font_ref})}
        )
    if title:
        writer.add_metadata({"/Title": title})
    with path.open("wb") as fh:
        writer.write(fh)


def config_for(folder: Path, **keys: Any) -> Config:
    block = {"documents_path": str(folder), **keys}
    return parse_config({"instructors": {"documents": block}})


# --- splitting ------------------------------------------------------------------------


def test_text_splits_on_paragraphs_near_the_target(tmp_path: Path) -> None:
    paragraphs = [para(i, sentences=3 + i % 3) for i in range(12)]  # 36 to 60 words each
    path = write(tmp_path, "notes.txt", "\n\n".join(paragraphs) + "\n")
    passages = split_document(path, "notes.txt", 150)
    assert len(passages) > 2
    sizes = [len(p.text.split()) for p in passages]
    assert all(75 <= n <= 225 for n in sizes), sizes
    assert sum(n > 150 for n in sizes) <= 1  # only a scrap-avoiding overflow
    # Paragraphs stay whole, in order, each in exactly one passage; nothing is lost.
    rebuilt = [p for passage in passages for p in passage.text.split("\n\n")]
    assert rebuilt == paragraphs
    assert [(p.index, p.count) for p in passages] == [
        (i, len(passages)) for i in range(len(passages))
    ]
    assert all(p.source == "notes.txt" and p.title is None and p.pages is None for p in passages)


def test_long_paragraph_is_cut_between_sentences(tmp_path: Path) -> None:
    long = para(99, sentences=30, words=10)  # 300 words, one paragraph
    path = write(tmp_path, "long.txt", long)
    passages = split_document(path, "long.txt", 80)
    sentences = split_sentences(long)
    assert len(passages) >= 4
    for p in passages:
        assert len(p.text.split()) <= 80
        assert p.text.endswith("ends.")
        # made of whole sentences of the paragraph
        assert all(s in sentences for s in split_sentences(p.text))
    assert sum(len(split_sentences(p.text)) for p in passages) == len(sentences)


def test_run_on_text_without_sentences_is_cut_between_words(tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(250)]
    path = write(tmp_path, "dump.txt", " ".join(words))
    passages = split_document(path, "dump.txt", 100)
    assert [len(p.text.split()) for p in passages] == [100, 100, 50]
    assert " ".join(p.text for p in passages).split() == words


def test_markdown_headings_become_title_and_sections(tmp_path: Path) -> None:
    text = (
        "---\ntitle: Port Handbook\nauthor: someone\n---\n"
        "# Port Handbook\n\n"
        f"{para(1)}\n\n"
        "## Tides\n\n"
        f"{para(2)}\n\n{para(3)}\n\n"
        "## Cranes\n"
        f"{para(4)}\n\n"
        "```\n# a comment in code, not a heading\nlift(crane)\n```\n\n"
        "Some ENDINPUT text that would break the block format, and so this paragraph "
        "is left out of the passages, though the rest of its passage is kept.\n"
    )
    path = write(tmp_path, "guide/handbook.md", text)
    passages = split_document(path, "guide/handbook.md", 50)
    assert all(p.title == "Port Handbook" for p in passages)
    sections = [p.section for p in passages]
    assert sections[0] == "Port Handbook"
    assert "Tides" in sections
    for p in passages:
        assert not p.text.startswith("#")  # a leading heading is metadata, not body
        assert "ENDINPUT" not in p.text
        assert valid_block(p.block("What happened?"))
    assert "a comment in code" not in sections
    assert any("# a comment in code" in p.text for p in passages)
    tides = next(p for p in passages if p.section == "Tides")
    assert tides.text.startswith("Record2x0")
    block = tides.block("Q?")
    assert "source: guide/handbook.md\ntitle: Port Handbook\nsection: Tides\nENDCONTEXT" in block


def test_pdf_pages_title_and_hyphenation(tmp_path: Path) -> None:
    pytest.importorskip("pypdf")
    page1 = [
        "The breakwater of Valmora was built of granite blocks",
        "brought by barge from the northern quarries in the year",
        "eighteen eighty four, and the work took six long years.",
        "Pilots complained that the harbour mouth was too narrow,",
        "so the engineers widened it by twelve metres in a second cam-",
        "paign that lasted through two hard winters.",
    ]
    page2 = [
        "The lantern on the quay was lit every evening by the keeper,",
        "who recorded the tide, the wind and every arriving ferry",
        "in a ledger that is still kept at the town museum today.",
    ]
    make_pdf(tmp_path / "port.pdf", [page1, page2], title="Valmora Harbour")
    passages = split_document(tmp_path / "port.pdf", "port.pdf", 60)
    assert passages, "no text extracted"
    assert all(p.title == "Valmora Harbour" for p in passages)
    joined = " ".join(p.text for p in passages)
    assert "second campaign that lasted" in joined  # hyphenated word mended
    assert "granite blocks brought by barge" in joined  # lines re-joined
    assert passages[0].pages in ("1", "1-2")
    assert passages[-1].pages in ("2", "1-2")
    assert "page" in "\n".join(passages[-1].context_lines())


def test_load_passages_reads_each_file_once_per_version(tmp_path: Path) -> None:
    path = write(tmp_path, "a.txt", "\n\n".join(para(i) for i in range(3)))
    write(tmp_path, ".hidden/skip.txt", para(50))
    write(tmp_path, "image.png", "not text")
    first = load_passages(tmp_path, 100)
    assert {p.source for p in first} == {"a.txt"}
    again = load_passages(tmp_path, 100)
    assert again[0] is first[0]  # served from the cache
    path.write_text("\n\n".join(para(i) for i in range(10, 14)), encoding="utf-8")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    changed = load_passages(tmp_path, 100)
    assert changed[0].text.startswith("Record10x0")


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DocumentsError, match="no such folder"):
        load_passages(tmp_path / "missing", 100)
    with pytest.raises(DocumentsError, match=r"no \.txt, \.md"):
        load_passages(tmp_path, 100)
    write(tmp_path, "bad.pdf", "this is not a pdf")
    with pytest.raises(DocumentsError, match=r"bad\.pdf"):
        load_passages(tmp_path, 100)
    write(tmp_path, "good.txt", para(1, sentences=5))
    assert {p.source for p in load_passages(tmp_path, 100)} == {"good.txt"}  # bad one skipped


# --- handing passages to batches --------------------------------------------------------


async def sources(tmp_path: Path, job_id: str = "job") -> tuple[SqlStore, StoreSources]:
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'store.sqlite'}")
    await store.connect()
    await store.jobs.ensure(job_id, config={}, targets={"documents": 100})
    return store, StoreSources(
        job_id, rows=store.rows, artifacts=store.artifacts, progress=store.progress
    )


async def test_batch_inputs_cover_every_passage_before_repeating(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    for f in range(3):
        write(docs, f"doc{f}.txt", "\n\n".join(para(f * 10 + i) for i in range(4)))
    cfg = config_for(docs, passage_words=50, questions_per_passage=2)
    total = len(load_passages(docs, 50))
    assert total >= 6
    rng = random.Random(3)
    store, src = await sources(tmp_path)
    seen: list[str] = []
    for _ in range(total // 2):
        inputs = await batch_inputs(cfg, "documents", src, 4, rng, job_id="job")
        assert inputs is not None and len(inputs) == 2  # ceil(4 questions / 2 per passage)
        seen.extend(f"{d['source']}#{d['index']}" for d in inputs)
    assert len(seen) == len(set(seen)) == total - total % 2
    # The next round starts over once everything was handed out.
    more: list[str] = []
    for _ in range(total):
        inputs = await batch_inputs(cfg, "documents", src, 4, rng, job_id="job")
        assert inputs is not None
        assert len({(d["source"], d["index"]) for d in inputs}) == len(inputs)
        more.extend(f"{d['source']}#{d['index']}" for d in inputs)
    assert set(seen + more) == {f"{p.source}#{p.index}" for p in load_passages(docs, 50)}
    # Random order, not file order.
    assert seen != sorted(seen)
    await store.close()


async def test_the_deck_survives_a_restart(tmp_path: Path) -> None:
    """Where the deck stands is in the store: a new controller (a restart, another
    replica) deals on from there, never handing a passage out twice in a round."""
    docs = tmp_path / "docs"
    for f in range(2):
        write(docs, f"doc{f}.txt", "\n\n".join(para(f * 10 + i) for i in range(4)))
    cfg = config_for(docs, passage_words=50, questions_per_passage=1)
    total = len(load_passages(docs, 50))
    store, src = await sources(tmp_path)
    first = await batch_inputs(cfg, "documents", src, 2, random.Random(1), job_id="job")
    await store.close()
    store, again = await sources(tmp_path)  # the same store, opened anew
    dealt = [*(first or [])]
    while len(dealt) < total:
        dealt += (
            await batch_inputs(cfg, "documents", again, 1, random.Random(2), job_id="job") or []
        )
    keys = [f"{d['source']}#{d['index']}" for d in dealt]
    assert len(keys) == len(set(keys)) == total
    await store.close()


async def test_batch_inputs_without_material_is_none(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    write(docs, "a.txt", para(1, sentences=5))
    cfg = config_for(docs)
    (docs / "a.txt").unlink()
    store, src = await sources(tmp_path)
    assert await batch_inputs(cfg, "documents", src, 4, random.Random(1), job_id="job") is None
    await store.close()


# --- parsing and grounding ------------------------------------------------------------


def test_parse_qa_accepts_variants_and_skips_broken_blocks() -> None:
    text = (
        "Sure, here they are.\n\n"
        "**QUESTION 1:** Who built the breakwater?\n"
        "**ANSWER 1:** Engineers from Genoa built it.\n"
        '**QUOTE 1:** "Engineers from Genoa designed a stone breakwater"\n\n'
        "QUESTION: Why did pilots complain?\nANSWER: The mouth was narrow.\n\n"
        "QUESTION: A question without an answer\n\n"
        "QUESTION: When?\nANSWER: In 1884.\nQUOTE: rebuilt in 1884 after a storm\n"
    )
    qas = parse_qa(text)
    assert qas == [
        QA(
            "Who built the breakwater?",
            "Engineers from Genoa built it.",
            '"Engineers from Genoa designed a stone breakwater"',
        ),
        QA("Why did pilots complain?", "The mouth was narrow.", None),
        QA("When?", "In 1884.", "rebuilt in 1884 after a storm"),
    ]
    assert parse_qa("no markers at all") == []


PASSAGE = (
    "The harbour of Valmora was rebuilt in 1884 after a storm destroyed the old wooden "
    "piers. Engineers from Genoa designed a stone breakwater, four hundred metres long; "
    "the work took six years.\n\nFishermen complained that the new harbour mouth was too "
    "narrow for their boats."
)


@pytest.mark.parametrize(
    ("qa", "problem"),
    [
        # grounded: quote differs only in case, punctuation and spacing
        (
            QA(
                "Who designed it?",
                "Engineers from Genoa designed the stone breakwater.",
                "engineers from genoa designed a stone   breakwater four hundred metres long",
            ),
            None,
        ),
        # grounded: fragments joined by an ellipsis, answer restating the passage
        (
            QA(
                "Why did fishermen complain?",
                "They complained that the harbour mouth was too narrow for their boats.",
                "Fishermen complained ... the new harbour mouth was too narrow",
            ),
            None,
        ),
        (QA("Q?", "The piers were rebuilt in 1884.", None), "no quote"),
        (QA("Q?", "The piers were rebuilt in 1884.", "rebuilt in"), "quote too short"),
        (
            QA("Q?", "It was rebuilt.", "The harbour was rebuilt in 1884 after storms"),
            "quote not in passage",
        ),
        # a real quote, an invented number
        (
            QA("When?", "It was rebuilt in 1885.", "rebuilt in 1884 after a storm"),
            "number 1885 not in passage",
        ),
        # a real quote, an answer that drifts away from it
        (
            QA(
                "Who paid?",
                "The Venetian admiralty financed the construction through maritime taxation.",
                "Engineers from Genoa designed a stone breakwater",
            ),
            "answer words not in passage",
        ),
    ],
)
def test_grounding(qa: QA, problem: str | None) -> None:
    got = grounding_problem(qa, PASSAGE)
    assert (got or "").startswith(problem or "") and (got is None) == (problem is None), got


def test_grounding_word_check_can_be_disabled() -> None:
    qa = QA(
        "¿Quién?", "Ingenieros de Génova diseñaron el rompeolas.", "Engineers from Genoa designed"
    )
    assert grounding_problem(qa, PASSAGE) is not None
    assert grounding_problem(qa, PASSAGE, support=0) is None


class Canned(Documents):
    """The real instructor with its LLM call replaced by a fixed reply."""

    reply = ""

    async def _complete(
        self, prompt: str, system: str | None, history: Any, params: Any
    ) -> tuple[str, str | None, tuple[int, int]]:
        self.prompts.append(prompt)
        return self.reply, "stop", (50, 50)


async def test_propose_keeps_grounded_answers_and_rejects_the_rest(tmp_path: Path) -> None:
    write(tmp_path, "harbour.txt", PASSAGE)
    cfg = config_for(tmp_path, questions_per_passage=3)
    inst = Canned(Ctx("documents", cfg, None, random.Random(1)))  # type: ignore[arg-type]
    inst.prompts = []
    inst.reply = (
        "QUESTION: Who designed the breakwater?\n"
        "ANSWER: Engineers from Genoa designed the stone breakwater.\n"
        "QUOTE: Engineers from Genoa designed a stone breakwater\n"
        "QUESTION: How much did it cost?\n"
        "ANSWER: It cost 40000 florins, paid by the Venetian admiralty.\n"
        "QUOTE: the work took six years\n"
        "QUESTION: What did fishermen say?\n"
        "ANSWER: That the new harbour mouth was too narrow for their boats.\n"
        "QUOTE: Fishermen complained that the new harbour mouth was too narrow\n"
        "QUESTION: A fourth one, past questions_per_passage?\n"
        "ANSWER: The harbour was rebuilt.\nQUOTE: The harbour of Valmora was rebuilt\n"
    )
    passage = load_passages(tmp_path, 300)[0]
    task = GenerateBatch(
        job_id="j", instructor="documents", batch_size=2, remaining=2, inputs=[passage.to_input()]
    )
    stats = BatchStats()
    cands = await inst.propose(task, stats)
    assert [c.response for c in cands] == [
        "Engineers from Genoa designed the stone breakwater.",
        "That the new harbour mouth was too narrow for their boats.",
    ]
    assert stats.filtered == 1
    for c in cands:
        assert valid_block(c.instruction)
        assert c.instruction.startswith(
            "BEGININPUT\nBEGINCONTEXT\nsource: harbour.txt\nENDCONTEXT\n"
        )
        assert PASSAGE in c.instruction
        question = c.instruction.split("BEGININSTRUCTION\n")[1].split("\nENDINSTRUCTION")[0]
        assert c.dedupe_text is not None and c.dedupe_text.startswith(question)
        assert PASSAGE not in c.dedupe_text
    prompt = inst.prompts[0]
    assert "<passage>\n" + PASSAGE + "\n</passage>" in prompt and "Write 3 questions" in prompt
    assert "{" not in prompt.replace("{}", "")  # every placeholder filled

    inst.reply = "Nothing in the expected layout."
    stats = BatchStats()
    # A reply with no item in it is unparseable, counted apart from filtered items.
    assert await inst.propose(task, stats) == []
    assert (stats.unparseable, stats.filtered) == (1, 0)


# --- configuration --------------------------------------------------------------------


def test_config_errors_name_documents_path(tmp_path: Path) -> None:
    def problems(**block: Any) -> str:
        with pytest.raises(ConfigError) as exc:
            parse_config({"instructors": {"documents": block}})
        return "; ".join(exc.value.problems)

    assert "instructors.documents.documents_path: required" in problems(count=3)
    missing = problems(documents_path=str(tmp_path / "nope"))
    assert "instructors.documents.documents_path: no such folder" in missing
    (tmp_path / "empty").mkdir()
    assert "documents_path: no .txt, .md, .markdown, .pdf files" in problems(
        documents_path=str(tmp_path / "empty")
    )
    write(tmp_path, "short/a.txt", "Too short to ask about.")
    assert "documents_path: no usable text" in problems(documents_path=str(tmp_path / "short"))
    write(tmp_path, "ok/a.txt", para(1))
    bad = problems(
        documents_path=str(tmp_path / "ok"),
        passage_words=10,
        questions_per_passage=0,
        answer_support=2,
    )
    assert "passage_words: must be" in bad
    assert "questions_per_passage: must be" in bad
    assert "answer_support: must be" in bad
    assert config_for(tmp_path / "ok").instructors["documents"].extra("documents_path")


# --- an embedded run ------------------------------------------------------------------


async def test_embedded_run_makes_grounded_rows(
    tmp_path: Path, llm_server: Any, embedder: Any
) -> None:
    folder = tmp_path / "docs"
    write(folder, "harbour.md", "# Harbour\n\n" + "\n\n".join(para(i) for i in range(6)))
    write(folder, "notes/tides.txt", "\n\n".join(para(i) for i in range(20, 26)))
    if importlib.util.find_spec("pypdf") is not None:
        lines = [
            f"Lantern line {i} tells of keeper {i} who kept the light burning." for i in range(8)
        ]
        make_pdf(folder / "lantern.pdf", [lines])
    srv = llm_server()
    cfg = write_config(
        tmp_path,
        srv.base_url,
        instructors={"documents": {"count": 6, "documents_path": str(folder), "passage_words": 60}},
    )
    result = await Generation(load_config(cfg), embedder=embedder, seed=7).run()
    assert result.status == "done", result.detail
    rows = read_rows(tmp_path / "instructions.jsonl")
    assert len(rows) == 6
    for r in rows:
        assert r["category"] == "documents"
        assert valid_block(r["instruction"]), r["instruction"]
        source = re.search(r"^source: (.+)$", r["instruction"], re.M)
        assert source and (folder / source.group(1)).is_file()
        passage = r["instruction"].split("ENDCONTEXT\n", 1)[1].split("\nENDINPUT", 1)[0]
        assert r["response"].startswith(GROUNDED_PREFIX), r["response"]
        claim = r["response"].removeprefix(GROUNDED_PREFIX)
        assert normalize(claim) in normalize(passage)
    # Ungrounded answers were served and every one of them was rejected.
    assert srv.llm.stats["documents_ungrounded"] > 0
    assert result.states["documents"].filtered > 0
