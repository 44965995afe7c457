"""Ingestion of the user's documents: a folder of .txt, .md and .pdf files split into
passages of about ``passage_words`` words on paragraph (then sentence) bounds, for the
``documents`` instructor (closed-context questions, the original's issue #12).

Passages are chosen on the planning side (the topics service, or the embedded run) and
travel to the generator in ``GenerateBatch.inputs`` (``Passage.to_input``); the
instructor itself (airoboros.generator.instructors.documents) asks the questions and
checks that each answer is grounded in its passage. This module also holds the
documents instructor's settings and their checks, which config validation needs.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airoboros.config import InstructorConfig

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

MARKERS = re.compile(r"BEGININPUT|ENDINPUT|BEGINCONTEXT|ENDCONTEXT|BEGININSTRUCTION|ENDINSTRUCTION")


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
    return MARKERS.sub("", " ".join(text.split())).strip()


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
            f"{path.name}: reading PDF needs pypdf (pip install 'airoboros[topics]')"
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
    units = [u for u in units if not MARKERS.search(u.text)]
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


# --- the instructor's settings ----------------------------------------------------------


def _valid_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def passage_settings(cfg: InstructorConfig) -> tuple[int, int, float]:
    """(passage_words, questions_per_passage, answer_support), defaults where unset or
    invalid (``check_settings`` reports the invalid ones)."""
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


def check_settings(cfg: InstructorConfig) -> list[str]:
    """Problems with the documents keys of a config block, each as 'key: message'."""
    problems: list[str] = []
    words = cfg.extra("passage_words", DEFAULT_PASSAGE_WORDS)
    if not _valid_int(words, MIN_PASSAGE_WORDS_SETTING, MAX_PASSAGE_WORDS_SETTING):
        problems.append(
            f"passage_words: must be a whole number from {MIN_PASSAGE_WORDS_SETTING} "
            f"to {MAX_PASSAGE_WORDS_SETTING}"
        )
    if not _valid_int(cfg.extra("questions_per_passage", DEFAULT_QUESTIONS), 1, MAX_QUESTIONS):
        problems.append(f"questions_per_passage: must be a whole number from 1 to {MAX_QUESTIONS}")
    support = cfg.extra("answer_support", DEFAULT_ANSWER_SUPPORT)
    if isinstance(support, bool) or not isinstance(support, int | float) or not 0 <= support <= 1:
        problems.append("answer_support: must be a number from 0 to 1")
    path = cfg.extra("documents_path")
    upload = cfg.extra("documents_upload")
    if upload is not None:
        # Documents posted to the services (POST /v1/documents): the service checks the
        # upload, and unpacks it into a folder for the job.
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
    try:
        passages = load_passages(path, passage_settings(cfg)[0])
    except DocumentsError as exc:
        problems.append(f"documents_path: {exc}")
        return problems
    if not passages:
        problems.append(
            f"documents_path: no usable text in {path} (a passage needs at least "
            f"{MIN_PASSAGE_WORDS} words)"
        )
    return problems
