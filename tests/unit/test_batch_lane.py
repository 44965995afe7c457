"""The Batch API lane's parts: call keys, the JSONL of input, output and error files,
the replaying stand-in for the LLM client, the batch price, and the budget that holds a
whole batch job before it is created."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from airoboros.config import Config
from airoboros.contracts import BatchAnswer, CallsDeferred, DeferredCall, GenerateBatch
from airoboros.errors import BudgetExhausted, ServerError
from airoboros.llm.accounting import call_cost
from airoboros.llm.batch import (
    BUDGET_ERROR,
    BatchClient,
    CallDeferred,
    ReplayLLM,
    answer_of,
    call_key,
    parse_jsonl,
    worst_usage,
    write_jsonl,
)
from airoboros.store import SqlStore
from airoboros.topics.batches import BatchLane

MESSAGES = [{"role": "user", "content": "Tell me a joke."}]


def body(text: str = "Tell me a joke.", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4", "messages": [{"role": "user", "content": text}], **extra}


# --- keys and JSONL ------------------------------------------------------------------------


def test_call_key_is_stable_and_tells_calls_apart():
    assert call_key("t1", 0, body()) == call_key("t1", 0, dict(reversed(body().items())))
    keys = {
        call_key("t1", 0, body()),
        call_key("t2", 0, body()),  # another task
        call_key("t1", 1, body()),  # the same request again: another sample
        call_key("t1", 0, body("Tell me another.")),
        call_key("t1", 0, body(temperature=0.5)),
    }
    assert len(keys) == 5
    assert all(len(k) <= 64 for k in keys)  # fits the store's key column


def test_write_jsonl_one_line_per_call_named_by_its_key():
    calls = [
        DeferredCall(key="a", body=body("one")),
        DeferredCall(key="b", body=body("two", max_tokens=20)),
        DeferredCall(key="a", body=body("one")),  # the same call twice: one line
    ]
    lines = [json.loads(x) for x in write_jsonl(calls, "/v1/chat/completions").splitlines()]
    assert [x["custom_id"] for x in lines] == ["a", "b"]
    assert {x["method"] for x in lines} == {"POST"}
    assert {x["url"] for x in lines} == {"/v1/chat/completions"}
    assert lines[1]["body"] == body("two", max_tokens=20)


def _ok(key: str, text: str, *, chat: bool = True) -> str:
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    answer = {"choices": [choice], "usage": {"prompt_tokens": 12, "completion_tokens": 30}}
    return json.dumps(
        {"custom_id": key, "response": {"status_code": 200, "body": answer}, "error": None}
    )


def test_parse_jsonl_reads_answers_and_failures():
    data = "\n".join(
        [
            _ok("a", "Why did the chicken..."),
            _ok("b", "plain text", chat=False),
            json.dumps(
                {
                    "custom_id": "c",
                    "response": {
                        "status_code": 500,
                        "body": {"error": {"message": "boom", "type": "server_error"}},
                    },
                    "error": None,
                }
            ),
            json.dumps(
                {
                    "custom_id": "d",
                    "response": None,
                    "error": {"code": "batch_expired", "message": "expired"},
                }
            ),
            "not json",
            json.dumps({"response": {}}),  # no custom_id
            "",
        ]
    ).encode()
    got = {r.key: r for r in parse_jsonl(data)}
    assert set(got) == {"a", "b", "c", "d"}
    assert got["a"].text == "Why did the chicken..." and got["a"].finish_reason == "length"
    assert (got["a"].prompt_tokens, got["a"].completion_tokens) == (12, 30)
    assert got["b"].text == "plain text"
    assert got["c"].text is None and "boom" in (got["c"].error or "")
    assert got["d"].text is None and "batch_expired" in (got["d"].error or "")


# --- price and budget ----------------------------------------------------------------------


def test_batch_discount_is_half_for_openai_models_and_can_be_overridden():
    cfg = Config.model_validate(
        {
            "prices": {
                "local-model": {"prompt": 1, "completion": 2},
                "gpt-4o": {"prompt": 2.5, "completion": 10, "batch_discount": 0.4},
            }
        }
    )
    assert cfg.batch_discount_for("gpt-4") == 0.5
    assert cfg.batch_discount_for("gpt-4-0613") == 0.5
    assert cfg.batch_discount_for("gpt-4o") == 0.4  # the price table's own
    assert cfg.batch_discount_for("local-model") == 1.0  # no known discount: none
    line = parse_jsonl(_ok("a", "x"))[0]
    a = answer_of(line, cfg, "gpt-4")
    assert a.cost == pytest.approx(call_cost(cfg.price_for("gpt-4"), 12, 30) * 0.5)
    assert a.cost == pytest.approx((12 * 30 + 30 * 60) / 1e6 / 2)


def test_worst_usage_bounds_what_a_batch_can_use_and_cost():
    cfg = Config.model_validate({"prices": {"gpt-4": {"prompt": 10, "completion": 10}}})
    calls = [DeferredCall(key="a", body=body("x" * 400, max_tokens=100))]
    # 400 chars at half a token each + formatting, 100 completion tokens, half price.
    tokens, cost = worst_usage(calls, cfg)
    assert tokens == 200 + 4 + 8 + 100
    assert cost == pytest.approx((200 + 4 + 8 + 100) * 10 / 1e6 * 0.5)
    no_cap = [DeferredCall(key="b", body=body("x"))]
    tokens, cost = worst_usage(no_cap, cfg)
    assert tokens > 4000 and cost > 4000 * 10 / 1e6 * 0.5


# --- replay --------------------------------------------------------------------------------


async def test_replay_records_missing_calls_then_answers_them():
    cfg = Config.model_validate({"max_completion_tokens": 64})
    first = ReplayLLM(cfg, "task-1", {})
    with pytest.raises(CallDeferred):
        await first.complete(MESSAGES, model="gpt-4", instructor="joke", params={"top_p": 1})
    with pytest.raises(CallDeferred):  # the same request again is another call
        await first.complete(MESSAGES, model="gpt-4", instructor="joke", params={"top_p": 1})
    keys = list(first.missing)
    assert len(keys) == 2
    sent = first.missing[keys[0]].body
    assert sent == {"model": "gpt-4", "messages": MESSAGES, "top_p": 1, "max_tokens": 64}

    answers = {
        keys[0]: BatchAnswer(text="one", prompt_tokens=3, completion_tokens=4, cost=0.5),
        keys[1]: BatchAnswer(error="500: boom (after 3 submissions)"),
    }
    again = ReplayLLM(cfg, "task-1", answers)
    c = await again.complete(MESSAGES, model="gpt-4", instructor="joke", params={"top_p": 1})
    assert (c.text, c.prompt_tokens, c.completion_tokens, c.cost) == ("one", 3, 4, 0.5)
    with pytest.raises(ServerError, match="boom"):
        await again.complete(MESSAGES, model="gpt-4", instructor="joke", params={"top_p": 1})
    assert not again.missing
    assert [u[2].text for u in again.used] == ["one"]

    spent = ReplayLLM(cfg, "task-1", {keys[0]: BatchAnswer(error=BUDGET_ERROR)})
    with pytest.raises(BudgetExhausted):
        await spent.complete(MESSAGES, model="gpt-4", instructor="joke", params={"top_p": 1})


# --- the budget holds a whole batch ---------------------------------------------------------


async def _lane(
    tmp_path: Path, base_url: str, max_cost: float | None, max_tokens: int | None = None
) -> tuple[BatchLane, Any]:
    cfg = Config.model_validate(
        {
            "base_url": base_url,
            "openai_api_key": "sk-test",
            "max_cost": max_cost,
            "max_tokens": max_tokens,
            "prices": {"gpt-4": {"prompt": 10, "completion": 10}},
            "instructors": {"joke": {}},
            "batch": True,
        }
    )
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 's.sqlite'}")
    await store.connect()
    await store.jobs.ensure("j", config={}, targets={"joke": 10})
    sent: list[Any] = []

    async def publish(msg: Any) -> None:
        sent.append(msg)

    lane = BatchLane(
        "j",
        cfg,
        batches=store.batches,
        progress=store.progress,
        publish=publish,
        client=BatchClient.for_config(cfg),
    )
    return lane, (store, sent)


def deferred(task: str, n: int) -> CallsDeferred:
    command = GenerateBatch(job_id="j", task_id=task, instructor="joke", batch_size=1, remaining=1)
    calls = [
        DeferredCall(key=f"{task}-{i}", body=body(f"{task} {i}", max_tokens=100)) for i in range(n)
    ]
    return CallsDeferred(
        job_id="j",
        task_id=task,
        instructor="joke",
        command=command.model_dump(mode="json"),
        calls=calls,
    )


async def test_budget_holds_a_whole_batch_before_it_is_created(tmp_path, llm_server):
    srv = llm_server()
    _, one = worst_usage(
        [deferred("t", 1).calls[0]],
        Config.model_validate({"prices": {"gpt-4": {"prompt": 10, "completion": 10}}}),
    )
    # Room for two calls' worst case, not three: a batch of 4 is cut to 2.
    lane, (store, _) = await _lane(tmp_path, srv.base_url, max_cost=one * 2.5)
    try:
        await lane.on_deferred(deferred("t1", 4))
        await lane.pump()
        subs = await store.batches.submissions("j")
        assert len(subs) == 1 and subs[0].state == "open"
        assert subs[0].reserved_cost == pytest.approx(one * 2)
        assert len(await store.batches.calls_of(subs[0].id)) == 2
        assert len(await store.batches.pending("j", "joke", 100)) == 2
        assert srv.llm.stats["batches_created"] == 1
        # While it is open its reservation holds the rest back; nothing is dropped.
        await lane.pump()
        assert srv.llm.stats["batches_created"] == 1
        assert len(await store.batches.pending("j", "joke", 100)) == 2
    finally:
        await lane.stop(cancel_open=True)
        await store.close()
    assert srv.llm.stats["batches_cancelled"] == 1


async def test_token_budget_holds_a_whole_batch_before_it_is_created(tmp_path, llm_server):
    srv = llm_server()
    one, _ = worst_usage([deferred("t", 1).calls[0]], Config())
    # max_tokens has room for two calls' worst case, not three: a batch of 4 is cut to 2,
    # and while it is open its reservation holds the rest back.
    lane, (store, _) = await _lane(tmp_path, srv.base_url, None, max_tokens=one * 2 + 1)
    try:
        await lane.on_deferred(deferred("t1", 4))
        await lane.pump()
        subs = await store.batches.submissions("j")
        assert len(subs) == 1 and subs[0].reserved_tokens == one * 2
        assert len(await store.batches.calls_of(subs[0].id)) == 2
        await lane.pump()
        assert srv.llm.stats["batches_created"] == 1
        assert len(await store.batches.pending("j", "joke", 100)) == 2
    finally:
        await lane.stop(cancel_open=True)
        await store.close()


async def test_a_batch_the_budget_cannot_hold_fails_its_calls(tmp_path, llm_server):
    srv = llm_server()
    lane, (store, sent) = await _lane(tmp_path, srv.base_url, max_cost=1e-9)
    try:
        await lane.on_deferred(deferred("t1", 2))
        await lane.pump()
        assert srv.llm.stats["batches_created"] == 0
        # The command goes back with the calls failed for the budget's sake.
        assert len(sent) == 1 and isinstance(sent[0], GenerateBatch)
        assert {a.error for a in sent[0].answers.values()} == {BUDGET_ERROR}
    finally:
        await lane.stop(cancel_open=False)
        await store.close()


async def test_lane_submits_polls_and_sends_the_command_again(tmp_path, llm_server):
    srv = llm_server()
    lane, (store, sent) = await _lane(tmp_path, srv.base_url, max_cost=None)
    try:
        msg = deferred("t1", 2)
        await lane.on_deferred(msg)
        await lane.on_deferred(msg)  # a redelivery: nothing new
        for _ in range(10):
            await lane.pump()
            lane._polls.clear()  # poll again at once
            if sent:
                break
        assert srv.llm.stats["batches_created"] == 1 and srv.llm.stats["batch_lines"] == 2
        assert len(sent) == 1
        answers = sent[0].answers
        assert set(answers) == {"t1-0", "t1-1"} and all(a.text for a in answers.values())
        assert sent[0].message_id != msg.command["message_id"]
        assert sent[0].task_id == "t1"
        assert lane.last_summary == {"joke": {"open": 0, "done": 1, "failed": 0}}
    finally:
        await lane.stop(cancel_open=True)
        await store.close()


async def test_a_batch_created_before_a_crash_is_found_not_created_again(tmp_path, llm_server):
    srv = llm_server()
    lane, (store, sent) = await _lane(tmp_path, srv.base_url, max_cost=None)
    try:
        await lane.on_deferred(deferred("t1", 2))
        keys = [p.key for p in await store.batches.pending("j", "joke", 10)]
        # The last process recorded the submission and created its batch job, then died
        # before it could store the batch id.
        sub = await store.batches.submit("j", "joke", keys, 0.0)
        calls = [DeferredCall(key=c.key, body=c.body) for c in await store.batches.calls_of(sub.id)]
        client = BatchClient.for_config(lane.config)
        file_id = await client.upload(write_jsonl(calls, "/v1/chat/completions"), "x.jsonl")
        made = await client.create(
            file_id, "/v1/chat/completions", "24h", {"airoboros_submission": sub.id}
        )
        await client.close()
        # Another batch job of someone else is on the account too.
        other = BatchClient.for_config(lane.config)
        await other.create(file_id, "/v1/chat/completions", "24h", {"airoboros_submission": "x"})
        await other.close()
        assert srv.llm.stats["batches_created"] == 2

        for _ in range(10):
            await lane.pump()
            lane._polls.clear()
            if sent:
                break
        assert srv.llm.stats["batches_created"] == 2  # found, not created again
        (stored,) = await store.batches.submissions("j")
        assert stored.batch_id == made.id and stored.state == "completed"
        assert len(sent) == 1 and set(sent[0].answers) == set(keys)
    finally:
        await lane.stop(cancel_open=True)
        await store.close()


async def test_cancel_cancels_open_and_submitting_batches(tmp_path, llm_server):
    srv = llm_server(batch_state_seconds=60)
    lane, (store, _) = await _lane(tmp_path, srv.base_url, max_cost=None)
    try:
        await lane.on_deferred(deferred("t1", 2))
        await lane.pump()
        await lane.on_deferred(deferred("t2", 2))
        keys = [p.key for p in await store.batches.pending("j", "joke", 10)]
        await store.batches.submit("j", "joke", keys, 0.0)  # recorded, never created
        assert await lane.cancel_open() == 2
        assert srv.llm.stats["batches_cancelled"] == 1
        assert {s.state for s in await store.batches.submissions("j")} == {"cancelled"}
        assert [b["status"] for b in srv.llm.batch_api.batches.values()] == ["cancelled"]
    finally:
        await lane.stop(cancel_open=False)
        await store.close()


async def test_an_endpoint_without_a_batch_api_fails_the_calls_not_the_loop(tmp_path, llm_server):
    srv = llm_server()
    lane, (store, sent) = await _lane(tmp_path, srv.base_url + "/nothing-here", max_cost=None)
    try:
        await lane.on_deferred(deferred("t1", 1))
        for _ in range(5):  # batch_max_attempts is 3: three refused submissions
            await lane.pump()
        assert len(sent) == 1
        (answer,) = sent[0].answers.values()
        assert "refused" in (answer.error or "") and "after 3 submissions" in (answer.error or "")
        assert [s.state for s in await store.batches.submissions("j")] == ["failed"] * 3
    finally:
        await lane.stop(cancel_open=False)
        await store.close()


# --- the generator's side: a command replays to the same calls -----------------------------


@pytest.mark.parametrize("name", ["general", "coding", "trivia", "riddle"])
async def test_a_command_asks_the_same_calls_until_it_has_every_answer(name):
    from airoboros.contracts import CandidatesProposed, CandidatesScreened, RespondToCandidates
    from airoboros.generator.service import GeneratorService, JobRuntime
    from airoboros.llm.factory import make_llm

    extra = {"coding_languages": ["python", "rust"]} if name == "coding" else {}
    cfg = Config.model_validate(
        {
            "base_url": "http://127.0.0.1:9/v1",  # never called
            "openai_api_key": "sk-test",
            "batch": True,
            "instructors": {name: {"count": 5, "batch_size": 3, **extra}},
        }
    )
    llm = make_llm(cfg)
    published: list[Any] = []

    async def publish(msg: Any) -> None:
        published.append(msg)

    async def runtime_for(_: Any) -> JobRuntime:
        return JobRuntime(cfg, llm)

    gen = GeneratorService(runtime_for, publish, seed=1)
    task = GenerateBatch(
        job_id="j", instructor=name, batch_size=3, remaining=5, topics=["owls", "rain", "tea"]
    )
    try:
        await gen.on_generate(task)
        (first,) = published
        assert isinstance(first, CallsDeferred) and first.calls
        # The same command again (a redelivery, another worker) asks the very same calls.
        await gen.on_generate(task)
        assert [c.key for c in published[1].calls] == [c.key for c in first.calls]
        # With answers it gets to its candidates (every instructor here asks one round).
        answers = {
            c.key: BatchAnswer(
                text="TSK 1. Write a poem about owls.\nTSK 2. Explain rain.\n"
                "QUESTION: What is tea? ANSWER: A drink.\n"
                "QUESTION: Why is rain wet? ANSWER: Water.",
                prompt_tokens=10,
                completion_tokens=20,
                cost=0.001,
            )
            for c in first.calls
        }
        replay = task.model_copy(update={"answers": answers})
        published.clear()
        await gen.on_generate(replay)
        (after,) = published
        assert isinstance(after, CandidatesProposed | CandidatesScreened)
        assert after.stats.requests == len(answers)
        assert after.stats.cost == pytest.approx(0.001 * len(answers))
        accepted = after.candidates if isinstance(after, CandidatesProposed) else after.accepted
        assert accepted
        if name in ("general", "coding"):  # two steps: the responses are the next round
            assert all(c.response is None for c in accepted)
            published.clear()
            respond = RespondToCandidates(
                job_id="j",
                task_id=task.task_id,
                instructor=name,
                candidates=accepted,
                stats=after.stats,
            )
            await gen.on_respond(respond)
            (step2,) = published
            assert isinstance(step2, CallsDeferred)
            assert len(step2.calls) == len(accepted)
    finally:
        await llm.close()
    assert llm.stats.calls == 0  # nothing went online
