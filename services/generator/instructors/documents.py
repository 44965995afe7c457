"""Closed-context questions over the user's own documents (the original's issue #12).

The controller side (``batch_inputs``) reads a folder of .txt, .md and .pdf files, splits
them into passages of about ``passage_words`` words on paragraph (then sentence) bounds,
and hands each batch passages it has not handed out yet (every passage once, in random
order, before any repeats). The worker side (``propose``) makes one LLM call per passage,
concurrently, asking for ``QUESTION:``/``ANSWER:``/``QUOTE:`` triples. A triple becomes a
row only if it is grounded in the passage (see ``grounding_problem``): the quote must be
found in the passage word for word (case, punctuation and spacing aside), and the answer's
numbers and most of its content words must be found there too. The row's instruction is a
BEGININPUT/BEGINCONTEXT block of the ``contextual`` format naming the source file; its
response is the answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import re
import threading
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airoboros.config import Config, InstructorConfig
from airoboros.contracts import Artifact, BatchStats, Candidate, GenerateBatch, Item
from airoboros.generator.instructors.base import (
    Filtered,
    Instructor,
    Sources,
    count_loss,
    gather_candidates,
    render,
)
from airoboros.generator.instructors.contextual import valid_block

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
PDF_SUFFIX = ".pdf"
SUFFIXES = (*TEXT_SUFFIXES, PDF_SUFFIX)

DEFAULT_PASSAGE_WORDS = 300
MIN_PASSAGE_WORDS_SETTING, MAX_PASSAGE_WORDS_SETTING = 50, 5000
DEFAULT_QUESTIONS = 2
MAX_QUESTIONS = 10
#: share of an answer's content words that must occur in the passage (0 disables: for
#: answers written in another language than the documents)
DEFAULT_ANSWER_SUPPORT = 0.6
#: passages shorter than this are dropped (a page number, a lone caption)
MIN_PASSAGE_WORDS = 20
#: a quote shorter than this proves nothing
MIN_QUOTE_WORDS = 4

_MARKERS = re.compile(
    r"BEGININPUT|ENDINPUT|BEGINCONTEXT|ENDCONTEXT|BEGININSTRUCTION|ENDINSTRUCTION"
)


class DocumentsError(Exception):
    """A documents folder or file that cannot be used; the message names what and why."""


# --- splitting ------------------------------------------------------------------------


@dataclass(frozen=True)
class Passage:
    """One passage of one document, as carried in ``GenerateBatch.inputs``."""

    source: str  #: path relative to documents_path, with forward slashes
    index: int  #: position in its document, from 0
    count: int  #: passages in its document
    text: str
    title: str | None = None
    section: str | None = None
    pages: str | None = None  #: "3" or "3-4" (PDF only)

    @property
    def key(self) -> str:
        digest = hashlib.sha1(self.text.encode("utf-8")).hexdigest()[:12]
        return f"{self.source}#{self.index}:{digest}"

    def to_input(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "index": self.index,
            "count": self.count,
            "text": self.text,
            "title": self.title,
            "section": self.section,
            "pages": self.pages,
        }

    @classmethod
    def from_input(cls, data: dict[str, Any]) -> Passage:
        return cls(
            source=str(data["source"]),
            index=int(data.get("index", 0)),
            count=int(data.get("count", 1)),
            text=str(data["text"]),
            title=data.get("title"),
            section=data.get("section"),
            pages=data.get("pages"),
        )

    def context_lines(self) -> list[str]:
        lines = [f"source: {self.source}"]
        if self.title:
            lines.append(f"title: {self.title}")
        if self.section and self.section != self.title:
            lines.append(f"section: {self.section}")
        if self.pages:
            lines.append(f"{'pages' if '-' in self.pages else 'page'}: {self.pages}")
        return lines

    def block(self, question: str) -> str:
        """The row's instruction: this passage in a BEGININPUT block, then the question."""
        context = "\n".join(self.context_lines())
        return (
            f"BEGININPUT\nBEGINCONTEXT\n{context}\nENDCONTEXT\n{self.text}\nENDINPUT\n"
            f"BEGININSTRUCTION\n{question}\nENDINSTRUCTION"
        )


@dataclass
class _Unit:
    """A paragraph (or a heading) of a document, before packing into passages."""

    text: str
    section: str | None = None
    page: int | None = None
    heading: bool = False

    @property
    def words(self) -> int:
        return 0 if self.heading else word_count(self.text)


def word_count(text: str) -> int:
    return len(text.split())


_SENTENCE_END = re.compile(r"(?<=[.!?。！？])([\"'”’»)\]]*)\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of a paragraph: cut after ., ! or ? (and closing quotes) and a space."""
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        end = m.start() + len(m.group(1))
        if text[start:end].strip():
            out.append(text[start:end].strip())
        start = m.end()
    if text[start:].strip():
        out.append(text[start:].strip())
    return out


def _split_long(text: str, target: int) -> list[str]:
    """A paragraph over ``target`` words as pieces of at most ``target`` words: whole
    sentences packed together; a sentence that is itself too long is cut at line breaks,
    and only a run-on line with neither is cut between words."""
    pieces: list[str] = []
    for sentence in split_sentences(text):
        if word_count(sentence) <= target:
            pieces.append(sentence)
            continue
        for line in sentence.splitlines():
            words = line.split()
            pieces.extend(" ".join(words[i : i + target]) for i in range(0, len(words), target))
    groups: list[list[str]] = []
    size = 0
    for piece in pieces:
        n = word_count(piece)
        if groups and size + n <= target:
            groups[-1].append(piece)
            size += n
        else:
            groups.append([piece])
            size = n
    return [" ".join(g) for g in groups]


def pack(units: list[_Unit], target: int) -> list[tuple[str, str | None, list[int]]]:
    """Paragraph units into passages of about ``target`` words: (text, section, pages).

    Paragraphs are kept whole and never split between passages unless one alone is over
    ``target``. A passage under half the target may run over it (to 1.5x) rather than
    leave a scrap; a heading starts a new passage unless the current one is still small;
    a short last passage joins the one before it when that stays under 1.5x.
    """
    limit = int(target * 1.5)
    expanded: list[_Unit] = []
    for u in units:
        if not u.heading and u.words > target:
            expanded.extend(
                _Unit(p, u.section, u.page) for p in _split_long(u.text, target) if p.strip()
            )
        else:
            expanded.append(u)

    passages: list[list[_Unit]] = []
    cur: list[_Unit] = []
    size = 0

    def flush() -> None:
        nonlocal cur, size
        if any(not u.heading for u in cur):
            passages.append(cur)
        cur, size = [], 0

    for u in expanded:
        if u.heading:
            if size >= target // 4:
                flush()
            cur.append(u)
            continue
        if cur and size + u.words > target and size >= target // 2:
            flush()
        cur.append(u)
        size += u.words
    flush()

    if len(passages) > 1:
        last, prev = passages[-1], passages[-2]
        last_words = sum(u.words for u in last)
        prev_words = sum(u.words for u in prev)
        if last_words < target // 4 and last_words + prev_words <= limit:
            passages[-2] = prev + last
            passages.pop()

    out: list[tuple[str, str | None, list[int]]] = []
    for group in passages:
        body = list(group)
        while body and body[0].heading:  # a leading heading is the passage's section
            body.pop(0)
        first = body[0]
        text = "\n\n".join(u.text for u in body)
        pages = sorted({u.page for u in body if u.page is not None})
        out.append((text, first.section, pages))
    return out


_MD_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")
_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?)\n(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.S)
_BLANK = re.compile(r"\n[ \t]*\n")


def _one_line(text: str) -> str:
    return _MARKERS.sub("", " ".join(text.split())).strip()


def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n").rstrip() for p in _BLANK.split(text) if p.strip()]


def text_units(text: str, markdown: bool) -> tuple[str | None, list[_Unit]]:
    """(title, units) of a text or markdown document. In markdown a heading line is a
    unit of its own that names the section of the paragraphs under it, and the title is
    the front matter's ``title:`` or the first level-1 heading."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    title: str | None = None
    if markdown:
        fm = _FRONT_MATTER.match(text)
        if fm:
            text = text[fm.end() :]
            m = re.search(r"^title:[ \t]*(.+)$", fm.group(1), re.M)
            if m:
                title = _one_line(m.group(1).strip("'\""))
    units: list[_Unit] = []
    section: str | None = None
    in_fence = False  # "# comment" inside a fenced code block is not a heading
    for para in _paragraphs(text):
        if not markdown:
            units.append(_Unit(para, section))
            continue
        lines: list[str] = []
        for line in para.split("\n"):
            if line.lstrip().startswith(("```", "~~~")):
                in_fence = not in_fence
            h = None if in_fence else _MD_HEADING.match(line)
            if not h:
                lines.append(line)
                continue
            if lines:
                units.append(_Unit("\n".join(lines).strip("\n"), section))
                lines = []
            section = _one_line(h.group(2)) or section
            if title is None and len(h.group(1)) == 1:
                title = section
            units.append(_Unit(line.strip(), section, heading=True))
        if lines and "\n".join(lines).strip():
            units.append(_Unit("\n".join(lines).strip("\n"), section))
    return title, units


_HYPHEN_BREAK = re.compile(r"(\w)-\n(\w)")


def pdf_units(path: Path) -> tuple[str | None, list[_Unit]]:
    """(title, units) of a PDF: its text page by page (pypdf), lines re-joined into
    paragraphs (a word hyphenated across a line break is mended)."""
    try:
        from pypdf import PdfReader
        from pypdf.errors import PyPdfError
    except ImportError:
        raise DocumentsError(
            f"{path.name}: reading PDF needs pypdf (pip install 'airoboros[generator]')"
        ) from None
    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentsError(f"{path.name}: the PDF is encrypted")
        meta = reader.metadata
        title = _one_line(meta.title) if meta is not None and meta.title else None
        units: list[_Unit] = []
        for number, page in enumerate(reader.pages, start=1):
            raw = (page.extract_text() or "").replace("\r\n", "\n").replace("\r", "\n")
            raw = _HYPHEN_BREAK.sub(r"\1\2", raw)
            for para in _paragraphs(raw):
                joined = " ".join(para.split())
                if joined:
                    units.append(_Unit(joined, None, number))
    except DocumentsError:
        raise
    except (PyPdfError, OSError, ValueError, KeyError, TypeError) as exc:
        raise DocumentsError(f"{path.name}: not a readable PDF ({exc})") from None
    return title or None, units


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def split_document(path: Path, source: str, target: int) -> list[Passage]:
    """The passages of one file."""
    suffix = path.suffix.lower()
    if suffix == PDF_SUFFIX:
        title, units = pdf_units(path)
    else:
        try:
            text = read_text(path)
        except OSError as exc:
            raise DocumentsError(f"{source}: cannot be read ({exc.strerror})") from None
        title, units = text_units(text, markdown=suffix in (".md", ".markdown"))
    # A paragraph holding one of the block markers would break the row's format: left out.
    units = [u for u in units if not _MARKERS.search(u.text)]
    packed = [
        (text, section, pages)
        for text, section, pages in pack(units, target)
        if word_count(text) >= MIN_PASSAGE_WORDS
    ]
    out = []
    for i, (text, section, pages) in enumerate(packed):
        span = None
        if pages:
            span = str(pages[0]) if pages[0] == pages[-1] else f"{pages[0]}-{pages[-1]}"
        out.append(Passage(source, i, len(packed), text, title, section, span))
    return out


def document_files(folder: Path) -> list[Path]:
    """Supported files under ``folder`` (recursively, hidden ones skipped), sorted."""
    found = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and p.suffix.lower() in SUFFIXES:
            found.append(p)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


#: (file, mtime_ns, size, passage_words) -> its passages, or why it cannot be used; a
#: changed file is read again
_CACHE: dict[tuple[str, int, int, int], list[Passage] | DocumentsError] = {}
_CACHE_LOCK = threading.Lock()


def load_passages(folder: str | Path, target: int) -> list[Passage]:
    """Every passage of the folder, in file then position order. A file is read once
    per (modification time, size). A file that cannot be used is skipped with a warning
    (once), unless no file can be used: then its error is raised."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DocumentsError(
            f"not a folder: {folder}" if root.exists() else f"no such folder: {folder}"
        )
    files = document_files(root)
    if not files:
        raise DocumentsError(f"no {', '.join(SUFFIXES)} files in {folder}")
    out: list[Passage] = []
    errors: list[str] = []
    with _CACHE_LOCK:
        for path in files:
            source = path.relative_to(root).as_posix()
            try:
                st = path.stat()
            except OSError as exc:
                errors.append(f"{source}: cannot be read ({exc.strerror})")
                continue
            key = (str(path.resolve()), st.st_mtime_ns, st.st_size, target)
            found = _CACHE.get(key)
            if found is None:
                try:
                    found = split_document(path, source, target)
                except DocumentsError as exc:
                    log.warning("documents: skipping %s", exc)
                    found = exc
                for old in [k for k in _CACHE if k[0] == key[0] and k[3] == target]:
                    del _CACHE[old]
                _CACHE[key] = found
            if isinstance(found, DocumentsError):
                errors.append(str(found))
            else:
                out.extend(found)
    if not out and errors:
        raise DocumentsError("; ".join(errors))
    return out


# --- handing passages to batches --------------------------------------------------------


@dataclass
class _Deck:
    """Passages not yet handed out in this round, in random order."""

    order: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    def draw(self, passages: list[Passage], n: int, rng: random.Random) -> list[Passage]:
        by_key = {p.key: p for p in passages}
        self.order = [k for k in self.order if k in by_key]  # files may have changed
        out: list[Passage] = []
        for _ in range(min(n, len(by_key))):
            if not self.order:
                fresh = [k for k in by_key if k not in self.seen]
                if not fresh:  # every passage was handed out: a new round
                    taken = {p.key for p in out}
                    self.seen = set(taken)
                    fresh = [k for k in by_key if k not in taken]
                rng.shuffle(fresh)
                self.order = fresh
            key = self.order.pop()
            self.seen.add(key)
            out.append(by_key[key])
        return out


#: (instructor, folder, passage_words) -> deck; per process, shared by its jobs
_DECKS: dict[tuple[str, str, int], _Deck] = {}


# --- parsing and grounding ------------------------------------------------------------


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    quote: str | None


_MARK = re.compile(r"[*_#>\s]*\b(QUESTION|ANSWER|QUOTE)\s*\d*\s*[*_]*\s*:[*_]*[ \t]*")


def parse_qa(text: str) -> list[QA]:
    """Triples from ``QUESTION: .. ANSWER: .. QUOTE: ..`` blocks (numbered or bold
    markers tolerated). A block without a question or an answer is skipped; a block
    without a quote keeps ``quote=None`` (and is rejected by grounding)."""
    out: list[QA] = []
    current: dict[str, str] = {}
    pieces = _MARK.split(text)
    # pieces: [before, KEY, value, KEY, value, ...]
    for i in range(1, len(pieces) - 1, 2):
        key, value = pieces[i], pieces[i + 1].strip()
        if key == "QUESTION":
            if current:
                out.append(_qa(current))
            current = {"QUESTION": value}
        elif current and key not in current:
            current[key] = value
    if current:
        out.append(_qa(current))
    return [qa for qa in out if qa.question and qa.answer]


def _qa(d: dict[str, str]) -> QA:
    quote = d.get("QUOTE")
    return QA(d.get("QUESTION", "").strip(), d.get("ANSWER", "").strip(), quote or None)


def normalize(text: str) -> str:
    """Casefolded words separated by single spaces: what two texts must share to count
    as the same wording (punctuation, quotes, dashes, case and spacing aside)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.findall(r"\w+", text))


_ELLIPSIS = re.compile(r"\.\.\.+|…|\[\s*\.\.\.\s*\]|\n")

_STOPWORDS = """a about above after again against all also am an and any are as at be because been
    before being below between both but by can could did do does doing down during each
    few for from further had has have having he her here hers herself him himself his how
    i if in into is it its itself just me more most my myself no nor not now of off on once
    only or other our ours out over own same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until up
    very was we were what when where which while who whom why will with would you your
    yours yes one two three many much may might must shall upon within without among
    according passage text document documents source mentioned mentions mention states
    stated say says said described describes author writes written based answer question
    quote context section page"""
STOPWORDS = frozenset(_STOPWORDS.split())


def _stem(word: str) -> str:
    if len(word) > 3 and word.endswith("s"):
        word = word[:-1]
    return word[:5] if len(word) > 5 else word


def content_words(text: str) -> list[str]:
    return [
        w for w in normalize(text).split() if len(w) >= 3 and not w.isdigit() and w not in STOPWORDS
    ]


def grounding_problem(
    qa: QA, passage: str, *, support: float = DEFAULT_ANSWER_SUPPORT
) -> str | None:
    """Why this answer is not grounded in the passage, or None when it is.

    1. The quote (the model's verbatim evidence) must have at least ``MIN_QUOTE_WORDS``
       words and be found in the passage; fragments joined by "..." or line breaks must
       each be found. Words are compared after ``normalize``, so case, punctuation and
       spacing do not matter but every word and its order do.
    2. Every number in the answer must occur in the passage (invented figures are the
       commonest hallucination, and a word check alone would let them through).
    3. At least ``support`` of the answer's content words (stopwords and words of three
       letters or fewer left out; a plural "s" and endings past five letters ignored) must
       occur in the passage, so an answer cannot drift away from a real quote.
    """
    if not qa.quote:
        return "no quote"
    hay = f" {normalize(passage)} "
    quote = qa.quote.strip().strip("\"'“”‘’«»")
    fragments = [normalize(f) for f in _ELLIPSIS.split(quote)]
    fragments = [f for f in fragments if f]
    if sum(len(f.split()) for f in fragments) < MIN_QUOTE_WORDS:
        return "quote too short"
    for frag in fragments:
        if f" {frag} " not in hay:
            return "quote not in passage"
    passage_numbers = set(re.findall(r"\d+", hay))
    for number in re.findall(r"\d+", normalize(qa.answer)):
        if number not in passage_numbers:
            return f"number {number} not in passage"
    words = content_words(qa.answer)
    if words and support > 0:
        stems = {_stem(w) for w in hay.split()}
        found = sum(1 for w in words if _stem(w) in stems)
        if found / len(words) < support:
            return f"answer words not in passage ({found}/{len(words)})"
    return None


# --- the instructor ---------------------------------------------------------------------


def _valid_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


class _NoSources:
    """The documents instructor reads no job rows or cards."""

    async def rows(
        self, categories: list[str], n: int, *, unused_by: str | None = None
    ) -> list[Item]:
        return []

    async def cards(self) -> list[Artifact]:
        return []


class Documents(Instructor):
    """Questions, answers and BEGININPUT blocks from the passages of ``documents_path``."""

    name = "documents"
    uses_topics = False
    phase = "main"
    dedupe_scope = "dataset"
    prompt_file = "documents.txt"

    # --- configuration ----------------------------------------------------------------
    @classmethod
    def settings(cls, cfg: InstructorConfig) -> tuple[int, int, float]:
        """(passage_words, questions_per_passage, answer_support), defaults where unset
        or invalid (validate reports the invalid ones)."""
        words = cfg.extra("passage_words", DEFAULT_PASSAGE_WORDS)
        if not _valid_int(words, MIN_PASSAGE_WORDS_SETTING, MAX_PASSAGE_WORDS_SETTING):
            words = DEFAULT_PASSAGE_WORDS
        questions = cfg.extra("questions_per_passage", DEFAULT_QUESTIONS)
        if not _valid_int(questions, 1, MAX_QUESTIONS):
            questions = DEFAULT_QUESTIONS
        support = cfg.extra("answer_support", DEFAULT_ANSWER_SUPPORT)
        if isinstance(support, bool) or not isinstance(support, int | float):
            support = DEFAULT_ANSWER_SUPPORT
        return words, questions, float(support)

    @classmethod
    def validate(cls, cfg: InstructorConfig) -> list[str]:
        problems = super().validate(cfg)
        words = cfg.extra("passage_words", DEFAULT_PASSAGE_WORDS)
        if not _valid_int(words, MIN_PASSAGE_WORDS_SETTING, MAX_PASSAGE_WORDS_SETTING):
            problems.append(
                f"passage_words: must be a whole number from {MIN_PASSAGE_WORDS_SETTING} "
                f"to {MAX_PASSAGE_WORDS_SETTING}"
            )
        if not _valid_int(cfg.extra("questions_per_passage", DEFAULT_QUESTIONS), 1, MAX_QUESTIONS):
            problems.append(
                f"questions_per_passage: must be a whole number from 1 to {MAX_QUESTIONS}"
            )
        support = cfg.extra("answer_support", DEFAULT_ANSWER_SUPPORT)
        if (
            isinstance(support, bool)
            or not isinstance(support, int | float)
            or not 0 <= support <= 1
        ):
            problems.append("answer_support: must be a number from 0 to 1")
        path = cfg.extra("documents_path")
        upload = cfg.extra("documents_upload")
        if upload is not None:
            # Documents posted to the services (POST /v1/documents): the service checks
            # the upload, and unpacks it into a folder for the job.
            if not isinstance(upload, str) or not upload:
                problems.append("documents_upload: the id that POST /v1/documents returned")
            if path:
                problems.append("documents_path: give documents_path or documents_upload, not both")
            return problems
        if not path or not isinstance(path, str):
            problems.append(
                "documents_path: required, a folder of .txt, .md or .pdf files (or, on the "
                "services, documents_upload: the id of a POST /v1/documents upload)"
            )
            return problems
        target = cls.settings(cfg)[0]
        try:
            passages = load_passages(path, target)
        except DocumentsError as exc:
            problems.append(f"documents_path: {exc}")
            return problems
        if not passages:
            problems.append(
                f"documents_path: no usable text in {path} (a passage needs at least "
                f"{MIN_PASSAGE_WORDS} words)"
            )
        return problems

    @classmethod
    async def batch_inputs(
        cls, config: Config, name: str, sources: Sources, batch_size: int, rng: random.Random
    ) -> list[dict[str, Any]] | None:
        """Passages for one batch: enough for ``batch_size`` questions, none handed out
        twice before every passage of the folder has been handed out once."""
        inst = config.instructors[name]
        folder = inst.extra("documents_path")
        if not folder or not isinstance(folder, str):
            return None
        target, questions, _ = cls.settings(inst)
        try:
            passages = await asyncio.to_thread(load_passages, folder, target)
        except DocumentsError as exc:
            log.warning("%s: documents_path: %s", name, exc)
            return None
        if not passages:
            return None
        deck = _DECKS.setdefault((name, str(Path(folder).expanduser().resolve()), target), _Deck())
        n = max(1, math.ceil(batch_size / questions))
        return [p.to_input() for p in deck.draw(passages, n, rng)]

    # --- step 1 -------------------------------------------------------------------------
    def prompt(self, passage: Passage, questions: int) -> str:
        extra = passage.context_lines()[1:]
        return render(
            self.prompt_template,
            source=passage.source,
            metadata=("\n" + "\n".join(extra)) if extra else "",
            passage=passage.text,
            question_count=questions,
            language=self.ctx.language,
            flesch=self.ctx.flesch,
        )

    async def _one(self, passage: Passage, stats: BatchStats) -> list[Candidate]:
        _, questions, support = self.settings(self.ctx.inst)
        reply = await self.ask_items(self.prompt(passage, questions))
        # Answers are filtered one by one below (reject_reason), with the grounding checks.
        triples = self.usable(
            parse_qa(reply.text), reply, stats, texts=lambda qa: (), apply_filters=False
        )
        out: list[Candidate] = []
        for qa in triples[:questions]:
            reason = self.reject_reason(qa, passage, support)
            if reason:
                log.debug(
                    "%s: %s: rejected %r (%s)", self.name, passage.source, qa.question, reason
                )
                count_loss(stats, reason)
                continue
            assert qa.quote is not None
            out.append(
                Candidate(
                    instruction=passage.block(qa.question),
                    response=qa.answer,
                    # The question with its evidence, not with the whole passage: two
                    # questions over one 300-word passage embed as near-copies (cosine
                    # 0.97) and would be rejected as duplicates, while the same question
                    # over two passages has two different quotes.
                    dedupe_text=f"{qa.question}\n{qa.quote}",
                    meta={"source": passage.source, "index": passage.index},
                )
            )
        return out

    def reject_reason(self, qa: QA, passage: Passage, support: float) -> str | None:
        if _MARKERS.search(qa.question) or _MARKERS.search(qa.answer):
            return "markers in the question or answer"
        if not valid_block(passage.block(qa.question)):
            return "not a valid block"
        filtered = self._filter.reason(
            qa.answer, finish_reason=None, apply_filters=self.filter_responses
        )
        if filtered:
            return filtered
        return grounding_problem(qa, passage.text, support=support)

    async def propose(self, task: GenerateBatch, stats: BatchStats) -> list[Candidate]:
        inputs = task.inputs
        if not inputs:
            # A controller that hands out no passages (an older one): pick them here,
            # from the worker's own view of documents_path.
            inputs = (
                await self.batch_inputs(
                    self.ctx.config, self.name, _NoSources(), task.batch_size, self.ctx.rng
                )
                or []
            )
        if not inputs:
            raise Filtered("no passages to work from")
        passages = [Passage.from_input(d) for d in inputs]
        return await gather_candidates([self._one(p, stats) for p in passages], stats)


DOCUMENTS_INSTRUCTORS: list[type[Instructor]] = [Documents]
