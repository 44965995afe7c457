"""airoboros.llm.accounting.UsageMeter and airoboros.llm.filters.ResponseFilter."""

from __future__ import annotations

import pytest

from airoboros.config import Price
from airoboros.errors import BudgetExhausted
from airoboros.llm.accounting import Usage, UsageMeter
from airoboros.llm.filters import ResponseFilter

PRICES = {"gpt-x": Price(prompt=2.0, completion=8.0)}

# --- UsageMeter ---------------------------------------------------------------------------


def test_cost_comes_from_prices_per_million_tokens() -> None:
    meter = UsageMeter(prices=PRICES)
    call = meter.record("general", "gpt-x", 1000, 500)
    assert call.cost == pytest.approx((1000 * 2.0 + 500 * 8.0) / 1_000_000)
    assert call.requests == 1
    assert call.total_tokens == 1500
    meter.record("writing", "gpt-x", 1_000_000, 0)
    assert meter.total.cost == pytest.approx(0.006 + 2.0)
    assert meter.total.requests == 2
    assert meter.by_instructor["general"].cost == pytest.approx(0.006)
    assert meter.by_instructor["writing"].prompt_tokens == 1_000_000


def test_unpriced_model_costs_nothing_but_counts_tokens() -> None:
    meter = UsageMeter(prices=PRICES)
    call = meter.record("general", "local-llm", 100, 100)
    assert call.cost == 0.0
    assert meter.total.total_tokens == 200


def test_token_budget_raises_once_reached() -> None:
    meter = UsageMeter(max_tokens=1000)
    meter.record("general", "m", 600, 300)
    meter.check()  # 900 < 1000
    assert meter.exhausted is None
    meter.record("writing", "m", 50, 50)  # exactly 1000
    assert meter.exhausted is not None
    with pytest.raises(BudgetExhausted, match="token budget of 1000"):
        meter.check()


def test_cost_budget_raises_once_reached() -> None:
    meter = UsageMeter(max_cost=0.01, prices=PRICES)
    meter.record("general", "gpt-x", 1000, 500)  # $0.006
    meter.check()
    meter.record("general", "gpt-x", 1000, 500)  # $0.012
    with pytest.raises(BudgetExhausted, match="cost budget"):
        meter.check()


def test_no_budget_never_raises() -> None:
    meter = UsageMeter(prices=PRICES)
    meter.record("general", "gpt-x", 10_000_000, 10_000_000)
    meter.check()


def test_preload_restores_counters_and_budget_spans_restarts() -> None:
    meter = UsageMeter(max_cost=1.0, max_tokens=10_000, prices=PRICES)
    meter.preload("general", Usage(requests=3, prompt_tokens=100, completion_tokens=50, cost=0.6))
    meter.preload("general", Usage(requests=1, prompt_tokens=10, completion_tokens=5, cost=0.1))
    assert meter.by_instructor["general"].requests == 4
    assert meter.by_instructor["general"].total_tokens == 165
    assert meter.total.cost == pytest.approx(0.7)
    meter.check()
    meter.preload("writing", Usage(requests=1, cost=0.3))
    assert meter.total.requests == 5
    with pytest.raises(BudgetExhausted):
        meter.check()


# --- ResponseFilter -----------------------------------------------------------------------


def test_truncated_when_finish_reason_is_length() -> None:
    f = ResponseFilter([])
    assert f.reason("A fine answer.", finish_reason="length") == "truncated"
    assert f.reason("A fine answer.", finish_reason="stop") is None
    assert f.reason("A fine answer.", finish_reason=None) is None


def test_empty_answer_is_dropped() -> None:
    f = ResponseFilter([])
    assert f.reason("   \n", finish_reason="stop") == "empty"


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that.",
        "I am sorry, that is not possible.",
        "  Apologies, I cannot do this.",
        "As an AI language model, I do not have opinions.",
        "i cannot comply with this request.",
        "I won't write that.",
    ],
)
def test_refusal_openings_are_dropped(text: str) -> None:
    assert ResponseFilter([]).reason(text, finish_reason="stop") == "refusal"


def test_refusal_words_later_in_the_text_are_fine() -> None:
    text = "The villain said: I'm sorry, but you cannot pass."
    assert ResponseFilter([]).reason(text, finish_reason="stop") is None


def test_custom_regex_is_case_insensitive() -> None:
    f = ResponseFilter([r"openai", r"\bdelve\b"])
    assert f.reason("Trained by OpenAI.", finish_reason="stop") == "filter:openai"
    assert f.reason("Let us DELVE into it.", finish_reason="stop") == r"filter:\bdelve\b"
    assert f.reason("Let us delver into it.", finish_reason="stop") is None


def test_apply_filters_false_skips_refusal_and_regex_but_not_truncation() -> None:
    f = ResponseFilter([r"banana"])
    assert f.reason("I'm sorry, no.", finish_reason="stop", apply_filters=False) is None
    assert f.reason("banana bread", finish_reason="stop", apply_filters=False) is None
    assert f.reason("banana bread", finish_reason="length", apply_filters=False) == "truncated"
