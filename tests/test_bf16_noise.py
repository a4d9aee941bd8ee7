"""The bf16 noise benchmark's arithmetic (the engine part is a plain vLLM run, nothing of ours)."""

from __future__ import annotations

from benchmarks.bf16_noise import margin_drift, shared_positions, summarize


def test_margin_drift_counts_steps_at_the_top_logit_and_flips():
    base = {1: 20.0, 2: 19.5, 3: 10.0}
    assert margin_drift(base, {1: 20.0, 2: 19.5}) == (0.0, 0.0, 20.0, False)
    steps, logits, top, flipped = margin_drift(base, {1: 19.75, 2: 19.875})
    assert (steps, logits, top, flipped) == (5.0, 0.625, 20.0, True)  # a step at 20 is 1/8
    assert margin_drift(base, {1: 20.0, 3: 10.0}) is None  # the runner-up not among the other's top


def test_contexts_are_compared_up_to_the_first_differing_token():
    assert shared_positions([1, 2, 3, 4], [1, 2, 9, 9]) == 3  # positions 0..2 had the same context
    assert shared_positions([1, 2], [1, 2, 3]) == 2
    row = summarize("w", [({1: 4.0, 2: 3.0}, {1: 4.0, 2: 3.0}), ({1: 4.0, 2: 3.0}, {1: 3.0, 2: 3.5})])
    assert row["contexts"] == 2 and row["argmax_flips"] == 1 and row["max_steps"] == 1.5 / 2 ** -5
