"""The instructor catalog is the planning side's whole knowledge of the generator: it must
name every instructor the generator runs, and nothing else, and every prompt it ships."""

from __future__ import annotations

import random
from pathlib import Path

from airoboros.catalog import CATALOG, PACKAGED_PROMPTS, PHASES, known_instructors
from airoboros.config import parse_config
from airoboros.contracts import Artifact, Item
from airoboros.generator.instructors.base import PROMPTS_DIR
from airoboros.generator.registry import implemented_instructors
from airoboros.store import SqlStore
from airoboros.topics.controller import StoreSources
from airoboros.topics.inputs import batch_inputs


def test_every_instructor_has_a_spec_and_every_spec_an_instructor() -> None:
    impl = implemented_instructors()
    assert set(impl) == set(CATALOG) == known_instructors()
    for name, cls in impl.items():
        assert cls.name == name
        assert CATALOG[name].phase in PHASES


def test_the_packaged_prompts_are_the_generators() -> None:
    shipped = {p.name for p in Path(PROMPTS_DIR).glob("*.txt")}
    assert shipped == PACKAGED_PROMPTS


def test_what_the_original_ran_in_later_phases() -> None:
    by_phase = {p: {n for n, s in CATALOG.items() if s.phase == p} for p in PHASES}
    assert by_phase["editor"] == {"editor"}
    assert by_phase["cards"] == {"character"}
    assert by_phase["characters"] == {"stylized_response", "gtkm", "awareness", "rp"}
    assert all(CATALOG[n].implies == ("character",) for n in by_phase["characters"])


async def test_every_kind_of_batch_material_is_dealt_from_the_store(tmp_path: Path) -> None:
    """Each instructor's batches get material of its declared kind from a real store."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(" ".join(f"word{i}" for i in range(200)) + ".\n")
    config = parse_config(
        {
            "instructors": {
                **{n: {} for n in CATALOG if n != "documents"},
                "coding": {"coding_languages": ["python"]},
                "documents": {"documents_path": str(docs)},
            }
        }
    )
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 's.sqlite'}")
    await store.connect()
    await store.jobs.ensure("j", config={}, targets={n: 10 for n in CATALOG})
    rows = [
        (f"r{i}", Item(instruction=f"q{i}", response=f"a{i}", category=c))
        for i, c in enumerate(["writing", "joke", "trivia"])
    ]
    await store.rows.add("j", rows, cap=False)
    cards = [Artifact(kind="character", name=n, data={"description": n}) for n in "ABC"]
    await store.artifacts.add("j", cards, count_as="character")
    sources = StoreSources("j", rows=store.rows, artifacts=store.artifacts, progress=store.progress)
    rng = random.Random(1)
    for name, spec in CATALOG.items():
        inputs = await batch_inputs(config, name, sources, 2, rng, job_id="j")
        assert inputs is not None, name
        assert (inputs == []) == (spec.inputs == "none"), name
    await store.close()
