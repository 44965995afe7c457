"""The web console as a person uses it, in headless Chromium against the real services
(tests/browser/conftest.py): the key, jobs from YAML, a bad config's problems by key, a
job followed to done, rows browsed, searched and marked bad (and the export without it),
cancel and resume, the experts and pods, a streamed chat in the playground. Each page is
saved as a screenshot under build/test-artifacts/console/."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from airoboros.contracts import Item
from tests.browser.conftest import (
    PHONE,
    Services,
    seed_job,
    shot,
    sign_in,
)
from tests.integration.services_harness import API_KEY

pytestmark = pytest.mark.browser

SMALL_JOB = """\
# a small job: two instructors, topics given
model: gpt-4
topics: [volcanoes, tea, rivers, glaciers, bridges, owls, maps, clocks]
default_batch_size: 4
request_timeout: 10
instructors:
  general:
    count: 6
  trivia:
    count: 4
"""

BAD_JOB = """\
model: gpt-4
topics: [volcanoes, tea]
default_batch_size: 4
instructors:
  general:
    count: -3
  trivia:
    count: 2
    batch_size: lots
"""

SEEDED = "console-seeded-1"
RP_SYSTEM = (
    "This is a chat between 3 characters: Mira, Tomas, Ilse\n\n"
    "Mira: A cartographer.\n\nTomas: A baker.\n\nIlse: A clockmaker.\n\n"
    "Setting for the chat:\nA rainy harbour town.\nEnd of setting."
)
SEEDED_ROWS = [
    Item(instruction="What is the tallest volcano?", response="Mauna Kea, from its base.",
         category="trivia"),
    Item(instruction="Name a green tea.", response="Sencha.", category="trivia",
         system="Answer in two words."),
    Item(
        instruction="A chat between Zora and Emily.\nDescription of Zora: A pilot who loves storms.\n"
        "Emily: Do you fly today?\nZora: Always, rain or shine.\nEmily: Even through thunder?",
        response="Zora: Especially through thunder.",
        category="gtkm",
        skip_prompt_formatting=True,
    ),
    Item(
        instruction=f"{RP_SYSTEM}\n\nLet's break the ice.\nTomas: The bread is still warm.\n"
        "Mira: I mapped the bakery's alley.\nIlse: And I fixed its clock.",
        response="Tomas: Then you both eat free today.",
        category="rp",
        skip_prompt_formatting=True,
    ),
]  # fmt: skip


@pytest.fixture(scope="module")
def done_job(services: Services) -> str:
    """A job run to the end by the services (posted through the API)."""
    job_id = services.post_job(
        {
            "model": "gpt-4",
            "topics": [f"topic {i}" for i in range(20)],
            "default_batch_size": 4,
            "request_timeout": 10,
            "instructors": {"general": {"count": 8}, "trivia": {"count": 6}},
        }
    )
    status = services.stack.wait_job(job_id, timeout=180)
    assert status["status"] == "done", services.stack.logs()
    return job_id


@pytest.fixture(scope="module")
def seeded(services: Services) -> str:
    filler = [
        Item(instruction=f"Filler question {i}?", response=f"Filler answer {i}.", category="trivia")
        for i in range(25)
    ]
    seed_job(
        services.database_url, SEEDED, SEEDED_ROWS + filler, {"trivia": 27, "gtkm": 1, "rp": 1}
    )
    return SEEDED


def export_rows(services: Services, job_id: str) -> list[dict[str, Any]]:
    with services.client() as c:
        r = c.get(f"/v1/jobs/{job_id}/export", params={"format": "airoboros"})
        assert r.status_code == 200, r.text
        return [json.loads(line) for line in r.text.splitlines() if line]


# --- the key ------------------------------------------------------------------------------


def test_key_is_asked_once_kept_for_the_tab_and_refused_keys_bring_the_form_back(
    page: Any, services: Services
) -> None:
    page.goto(services.console)
    assert page.get_by_role("heading", name="API key").is_visible()
    page.get_by_label("API key").fill("not-a-key")
    page.get_by_role("button", name="Continue").click()
    page.get_by_text("refused").first.wait_for()
    assert page.evaluate("sessionStorage.length + localStorage.length") == 0

    sign_in(page, services)
    assert page.get_by_role("heading", name="Jobs", exact=True).is_visible()
    assert page.evaluate("Object.values(sessionStorage)") == [API_KEY]
    assert page.evaluate("localStorage.length") == 0  # not remembered unless asked
    page.reload()
    page.get_by_role("heading", name="Jobs", exact=True).wait_for()  # no second prompt
    shot(page, "01-jobs")

    # A key that stops working (rotated, revoked): the next call's 401 asks again.
    page.evaluate("sessionStorage.setItem(sessionStorage.key(0), 'revoked-key')")
    page.get_by_role("button", name="Refresh").click()
    page.get_by_role("heading", name="API key").wait_for()
    assert page.get_by_text("refused").first.is_visible()
    assert page.evaluate("sessionStorage.length") == 0

    # "Remember on this device": a new tab of the same browser is signed in.
    sign_in(page, services, remember=True)
    other = page.context.new_page()
    other.goto(services.console + "#/jobs")
    other.get_by_role("heading", name="Jobs", exact=True).wait_for()
    other.close()
    page.get_by_role("button", name="Forget key").click()
    page.get_by_role("heading", name="API key").wait_for()
    assert page.evaluate("sessionStorage.length + localStorage.length") == 0


# --- jobs ---------------------------------------------------------------------------------


def test_a_job_created_from_yaml_runs_to_done_on_its_page(page: Any, services: Services) -> None:
    sign_in(page, services)
    page.get_by_label("Config (YAML)").fill(SMALL_JOB)
    page.get_by_role("button", name="Create job").click()
    page.wait_for_url(re.compile(r".*#/jobs/[^/]+$"))
    job_id = page.url.rsplit("/", 1)[1]
    progress = page.locator(".progress-table")
    progress.locator("tr[data-instructor=general]").wait_for()
    assert progress.locator("tbody tr").count() == 2
    # Progress while it runs (when the job is not already over).
    first = page.locator(".progress-table tr[data-instructor=general] .progress-text").inner_text()
    assert re.fullmatch(r"\d+ / 6", first), first
    # From here on the table only updates: nothing in it may move (layout shifts).
    page.evaluate(
        """() => {
        window.__shifts = [];
        new PerformanceObserver((list) => {
          for (const e of list.getEntries()) {
            for (const s of e.sources || []) {
              if (s.node && s.node.closest && s.node.closest('.progress-table, .job-summary'))
                window.__shifts.push(e.value);
            }
          }
        }).observe({ type: 'layout-shift' });
    }"""
    )
    page.locator("h1 .status-done").wait_for(timeout=150_000)
    assert page.evaluate("() => window.__shifts") == []
    assert page.locator("tr[data-instructor=general] .progress-text").inner_text() == "6 / 6"
    assert page.locator("tr[data-instructor=trivia] .progress-text").inner_text() == "4 / 4"
    assert page.locator("tr[data-instructor=general] td").nth(6).inner_text() == "done"
    # Finished: the quality report is loaded, with the job's categories and totals.
    report = page.locator(".report-table")
    report.wait_for()
    assert report.locator("tbody th").all_inner_texts() == ["general", "trivia"]
    assert report.locator("tfoot th").inner_text() == "Total"
    assert page.get_by_role("button", name="Cancel job").is_hidden()
    assert page.get_by_text("None: every message of this job was handled.").is_visible()
    shot(page, "02-job-done")
    services.jobs["ui"] = job_id

    # The jobs list shows it, done, with its progress.
    page.get_by_role("link", name="Jobs", exact=True).first.click()
    row = page.locator(f"tr[data-job='{job_id}']")
    row.wait_for()
    assert "done" in row.inner_text()
    assert "10 / 10" in row.inner_text()


def test_a_bad_config_shows_its_problems_next_to_their_keys(
    page: Any, services: Services, tmp_path: Path
) -> None:
    with services.client() as c:
        jobs_before = len(c.get("/v1/jobs").json()["data"])
    sign_in(page, services)
    config = tmp_path / "bad.yaml"
    config.write_text(BAD_JOB)
    page.get_by_label("Config file").set_input_files(str(config))
    textarea = page.get_by_label("Config (YAML)")
    assert textarea.input_value() == BAD_JOB  # the file is loaded into the box
    page.get_by_role("button", name="Create job").click()
    problems = page.locator(".problems li")
    problems.first.wait_for()
    keyed = {li.get_attribute("data-key"): li.inner_text() for li in problems.all()}
    assert "instructors.general.count" in keyed, keyed
    assert "instructors.trivia.batch_size" in keyed, keyed
    # The lines of those keys are marked in the box (1-based lines of BAD_JOB: 6 and 9).
    marked = page.locator(".yaml-line").evaluate_all(
        "ls => ls.flatMap((l, i) => l.classList.contains('marked') ? [i + 1] : [])"
    )
    assert marked == [6, 9], marked
    assert textarea.get_attribute("aria-invalid") == "true"
    # A problem's key takes the cursor to its line.
    page.locator(".problems li[data-key='instructors.trivia.batch_size'] button").click()
    selected = textarea.evaluate("t => t.value.slice(t.selectionStart, t.selectionEnd)")
    assert selected == "    batch_size: lots"
    shot(page, "03-jobs-bad-config")
    with services.client() as c:  # no job was made
        assert len(c.get("/v1/jobs").json()["data"]) == jobs_before
    page.set_viewport_size(PHONE)
    shot(page, "03-jobs-bad-config-phone")


def test_cancel_and_resume_a_job(page: Any, services: Services) -> None:
    script = services.llm.script
    script.latency = 0.8  # slow enough to act on it while it runs
    try:
        job_id = services.post_job(
            {
                "model": "gpt-4",
                "topics": [f"subject {i}" for i in range(30)],
                "default_batch_size": 2,
                "max_concurrency": 2,
                "request_timeout": 10,
                # A task lost in flight is reissued only after request_timeout +
                # max_retry_time + 60 s: long, so a lost task cannot go unnoticed below.
                "max_retry_time": 600,
                "instructors": {"general": {"count": 40}},
            }
        )
        sign_in(page, services, f"#/jobs/{job_id}")
        page.locator("h1 .status-running").wait_for()
        assert page.get_by_role("button", name="Resume job").is_hidden()
        page.get_by_role("button", name="Cancel job").click()
        page.locator("h1 .status-cancelled").wait_for(timeout=60_000)
        assert page.get_by_role("button", name="Cancel job").is_hidden()
        accepted = page.locator("tr[data-instructor=general] .progress-text").inner_text()
        assert not accepted.startswith("40 /"), accepted
        assert page.locator("tr[data-instructor=general] td.state").inner_text() == "cancelled"
        shot(page, "04-job-cancelled")

        # Resumed: running again, polled again, and on to its full count (a worker that
        # had just seen the job cancelled once dropped the resumed run's first task).
        script.latency = 0.02
        page.get_by_role("button", name="Resume job").click()
        page.locator("h1 .status-running").wait_for()
        page.get_by_text("Resumed; the job is running.").wait_for()
        assert page.get_by_role("button", name="Resume job").is_hidden()
        assert page.get_by_role("button", name="Cancel job").is_visible()
        # A task dropped on a stale "cancelled" would hold it for its 670 s task timeout.
        page.locator("h1 .status-done").wait_for(timeout=180_000)
        with services.client() as c:
            done = c.get(f"/v1/jobs/{job_id}").json()
        assert done["status"] == "done"
        assert done["instructors"]["general"]["accepted"] == 40
        expect(page.locator("tr[data-instructor=general] .progress-text")).to_contain_text(
            "40 / 40"
        )
    finally:
        script.latency = 0.02


# --- rows ---------------------------------------------------------------------------------


def test_rows_by_category_search_and_mark_bad_changes_the_export(
    page: Any, services: Services, done_job: str
) -> None:
    sign_in(page, services, f"#/jobs/{done_job}/rows")
    cards = page.locator("article.row-card")
    cards.first.wait_for()
    assert cards.count() == 14  # 8 general + 6 trivia, one page
    page.get_by_label("Category").select_option("trivia")
    expect(cards).to_have_count(6)
    assert set(cards.evaluate_all("cs => cs.map(c => c.dataset.category)")) == {"trivia"}
    assert "category=trivia" in page.url  # the filter is in the address

    # Search: a word of one row's response finds that row.
    rows = export_rows(services, done_job)
    target = next(r for r in rows if r["category"] == "trivia")
    word = max(
        re.findall(r"[A-Za-z]{5,}", f"{target['instruction']} {target['response']}"), key=len
    )
    page.get_by_label("Search", exact=True).fill(word)
    page.get_by_role("button", name="Search", exact=True).click()
    page.wait_for_function(
        "w => [...document.querySelectorAll('article.row-card')].length >= 1 && "
        "[...document.querySelectorAll('article.row-card')].every("
        "c => c.textContent.toLowerCase().includes(w.toLowerCase()))",
        arg=word,
    )  # (a function: a bare expression would be eval'd, which the page's CSP forbids)
    card = cards.filter(has_text=target["instruction"][:40]).first
    card.wait_for()
    seq = card.get_attribute("data-seq")

    # Mark it bad: the row stays listed, the export leaves it out.
    card.get_by_role("button", name="Mark bad").click()
    card.get_by_role("button", name="Unmark bad").wait_for()
    assert card.locator(".bad-badge").is_visible()
    assert card.get_by_role("button", name="Unmark bad").get_attribute("aria-pressed") == "true"
    page.get_by_text("1 marked bad in this job.").wait_for()
    shot(page, "05-rows-marked-bad")
    after = export_rows(services, done_job)
    assert len(after) == len(rows) - 1
    assert target["instruction"] not in [r["instruction"] for r in after]

    # The export downloaded through the console (fetch -> Blob) agrees.
    page.goto(f"{services.console}#/jobs/{done_job}")
    with page.expect_download() as info:
        page.get_by_role("button", name="Download airoboros JSONL").click()
    download = info.value
    assert download.suggested_filename == f"{done_job}.jsonl"
    got = [json.loads(x) for x in Path(download.path()).read_text().splitlines() if x]
    assert got == after
    with page.expect_download() as info:
        page.get_by_role("button", name="Download ShareGPT JSONL").click()
    sharegpt = Path(info.value.path()).read_text().splitlines()
    assert len(sharegpt) == len(after)
    assert info.value.suggested_filename == f"{done_job}.sharegpt.jsonl"
    with page.expect_download() as info:
        page.get_by_role("button", name="Download Parquet").click()
    assert info.value.suggested_filename == f"{done_job}.parquet"
    assert Path(info.value.path()).read_bytes()[:4] == b"PAR1"
    assert page.locator(".fact", has_text="Marked bad").locator("dd").inner_text() == "1"

    # Unmark: it is back in the export.
    page.goto(f"{services.console}#/jobs/{done_job}/rows?q={word}")
    card = page.locator(f"article.row-card[data-seq='{seq}']")
    card.get_by_role("button", name="Unmark bad").click()
    card.get_by_role("button", name="Mark bad").wait_for()
    assert export_rows(services, done_job) == rows


def test_rows_page_through_and_show_conversations(
    page: Any, services: Services, seeded: str
) -> None:
    sign_in(page, services, f"#/jobs/{seeded}/rows")
    page.locator("article.row-card").first.wait_for()
    first_seq = page.locator("article.row-card").first.get_attribute("data-seq")
    # The system prompt is shown with its row.
    system_row = page.locator("article.row-card", has_text="Name a green tea.")
    assert system_row.locator(".field-block.system").inner_text().endswith("Answer in two words.")
    # gtkm: the transcript as turns, the response as the last.
    gtkm = page.locator("article.row-card[data-category=gtkm]")
    turns = gtkm.locator(".conversation .turn")
    assert turns.count() == 4
    assert turns.nth(0).locator(".speaker").inner_text() == "Emily"
    assert "user" in (turns.nth(0).get_attribute("class") or "")
    assert turns.nth(3).locator(".speaker").inner_text() == "Zora (response)"
    assert turns.nth(3).locator(".text").inner_text() == "Especially through thunder."
    assert "Description of Zora" in gtkm.locator(".field-block.preamble").inner_text()
    # rp: the start phrase is the user's (Mira, the first card); the setting is shown apart.
    rp = page.locator("article.row-card[data-category=rp]")
    speakers = rp.locator(".conversation .speaker").all_inner_texts()
    assert speakers == ["Mira", "Tomas", "Mira", "Ilse", "Tomas (response)"]
    assert "A rainy harbour town." in rp.locator(".field-block.preamble").inner_text()
    shot(page, "06-rows-conversations")
    page.set_viewport_size(PHONE)
    shot(page, "06-rows-conversations-phone")

    # Paging: 29 rows, 20 a page.
    page.set_viewport_size({"width": 1280, "height": 800})
    cards = page.locator("article.row-card")
    assert cards.count() == 20
    assert page.get_by_role("button", name="Previous page").is_disabled()
    page.get_by_role("button", name="Next page").click()
    expect(cards).to_have_count(9)
    assert cards.first.get_attribute("data-seq") == str(int(first_seq) + 20)
    assert page.get_by_role("button", name="Next page").is_disabled()
    page.get_by_role("button", name="Previous page").click()
    expect(cards).to_have_count(20)
    assert cards.first.get_attribute("data-seq") == first_seq


# --- experts and playground ----------------------------------------------------------------


def test_experts_page_lists_the_pods_and_their_adapters(page: Any, services: Services) -> None:
    sign_in(page, services, "#/experts")
    page.get_by_role("heading", name="Inference pods").wait_for()
    page.get_by_text("No adapter registered yet").wait_for()
    pods = page.locator(".pods-table")
    pods.wait_for()
    assert pods.locator("tbody tr").count() == 1
    adapters = pods.locator(".chips li").all_inner_texts()
    assert {"code", "cooking"} <= set(adapters), adapters
    assert services.lmoe_url in page.locator("main").inner_text()  # the router's URL
    shot(page, "07-experts")


def test_playground_streams_an_answer_and_shows_the_chosen_expert(
    page: Any, services: Services
) -> None:
    sign_in(page, services, "#/playground")
    model = page.get_by_label("Model")
    expect(model.locator("option")).to_have_count(3)
    assert {"auto", "code", "cooking"} <= set(
        model.locator("option").evaluate_all("os => os.map(o => o.value)")
    )
    page.get_by_label("Max tokens").fill("12")
    page.get_by_label("Message").fill("Write a python function that sorts a list.")
    with page.expect_response(lambda r: r.url.endswith("/v1/playground/chat/completions")) as info:
        page.get_by_role("button", name="Send").click()
    response = info.value
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    page.get_by_text("Done.").wait_for(timeout=60_000)
    assert page.locator("#pg-expert").inner_text() == "code"
    usage = page.locator("#pg-usage").inner_text()
    m = re.search(r"(\d+) prompt \+ (\d+) completion = (\d+) tokens", usage)
    assert m and 0 < int(m[2]) <= 12, usage
    turns = page.locator(".chat-log .turn")
    assert turns.count() == 2
    assert turns.nth(1).locator(".speaker").inner_text() == "Assistant · code"
    shot(page, "08-playground")

    # A named expert is used as named.
    model.select_option("cooking")
    page.get_by_label("Message").fill("And one in Rust?")
    page.get_by_role("button", name="Send").click()
    expect(page.locator(".chat-log .turn")).to_have_count(4)
    page.get_by_text("Done.").wait_for(timeout=60_000)
    assert page.locator("#pg-expert").inner_text() == "cooking"
    page.set_viewport_size(PHONE)
    shot(page, "08-playground-phone")


# --- keyboard, labels, small screens -------------------------------------------------------


def test_keyboard_labels_and_phone_width(page: Any, services: Services, done_job: str) -> None:
    sign_in(page, services)
    # Tab order from the top of a fresh page: the skip link, then the navigation.
    page.reload()
    page.get_by_role("heading", name="Jobs", exact=True).wait_for()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "skip-link"
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Experts"
    page.keyboard.press("Enter")
    page.get_by_role("heading", name="Experts", exact=True).wait_for()
    # The new page's heading has the focus (where a screen reader starts).
    assert page.evaluate("document.activeElement.tagName") == "H1"

    unlabelled = """() => [...document.querySelectorAll('input, select, textarea')]
        .filter(e => e.type !== 'hidden' && !(e.labels && e.labels.length) &&
                !e.getAttribute('aria-label'))
        .map(e => e.outerHTML)"""
    for hash_, loaded in (
        ("#/jobs", ".jobs-table"),
        (f"#/jobs/{done_job}", ".report-table"),
        (f"#/jobs/{done_job}/rows", "article.row-card"),
        ("#/playground", "#pg-model option[value=code]"),
    ):
        page.goto(services.console + hash_)
        page.locator(loaded).first.wait_for(state="attached")
        assert page.evaluate(unlabelled) == [], hash_
        assert page.locator("main div[onclick], main span[onclick]").count() == 0

    # A phone: nothing wider than the screen but the tables' own scrolling boxes.
    page.set_viewport_size(PHONE)
    for name, hash_, loaded in (
        ("jobs", "#/jobs", ".jobs-table"),
        ("job", f"#/jobs/{done_job}", ".report-table"),
        ("rows", f"#/jobs/{done_job}/rows", "article.row-card"),
        ("experts", "#/experts", ".pods-table"),
    ):
        page.goto(services.console + hash_)
        page.locator(loaded).first.wait_for()
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], (hash_, width)
        shot(page, f"09-{name}-phone")
