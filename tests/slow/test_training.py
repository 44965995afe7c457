"""A LoRA trained a few steps on real alpaca rows (the trainer's ``train_expert``, as
``airoboros train-experts`` runs it) on the real SmolLM2 model learns something."""

from __future__ import annotations

from typing import Any


def test_a_few_steps_lower_held_out_loss_and_change_the_greedy_answer(
    trained: dict[str, Any],
) -> None:
    metrics = trained["result"].metrics
    assert metrics["steps"] == 12
    assert trained["loss_after"] < trained["loss_before"] - 0.05, (
        trained["loss_before"],
        trained["loss_after"],
    )
    assert trained["tuned_answer"] != trained["base_answer"]
    assert trained["tuned_answer"].strip()
