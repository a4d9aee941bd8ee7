"""Exact simulator: hand-checked walks, static baselines, and the Dinkelbach oracle vs brute force."""

import itertools

import numpy as np
import pytest

from vllm_respsp.policy.cost import CostModel, load_cost_model
from vllm_respsp.policy.simulator import (
    GATE_LOADS,
    best_static,
    draft_load_limit,
    drafts_at,
    no_speculation_rate,
    oracle,
    simulate,
    simulate_gated,
    static_results,
    summary,
)
from vllm_respsp.policy.traces import FeatureSpec, Generation, TraceSet, synthetic_traces
from vllm_respsp.tree.shape import EAGLE3_DEFAULT, NO_DRAFTS, TreeShape, chain

ACTIONS = [chain(1), chain(3)]


def fixed_cost(costs):
    """A CostModel whose request cost per action is given (via a 'draft_pass' term = depth)."""
    # chain(1) has depth 1, chain(3) depth 3: t = step + draft_pass * depth
    return CostModel(("step", "draft_pass"), np.array(costs))


def table(rows):
    acc = np.array(rows, dtype=np.int16)
    gen = Generation("p", "s", np.zeros((len(rows), 1), np.float32), acc)
    return TraceSet(ACTIONS, [FeatureSpec("f", 1)], [gen]).validate()


def test_walk_by_hand():
    # positions 0..5; chain(3) accepts 2 at p=0 -> lands on 3, accepts 3 there -> gains min(4, 3)
    traces = table([[1, 2], [0, 0], [0, 0], [1, 3], [0, 0], [0, 0]])
    cost = fixed_cost([0.01, 0.005])  # chain(1): 0.015 s, chain(3): 0.025 s
    res = simulate(traces, cost, 1)
    assert (res.tokens, res.steps) == (6, 2) and res.seconds == pytest.approx(0.05)
    res = simulate(traces, cost, 0)  # p0 +2 -> p2 +1 -> p3 +2 -> p5 +1
    assert (res.tokens, res.steps) == (6, 4) and res.seconds == pytest.approx(0.06)
    assert res.acceptance_length == 1.5
    tokens, seconds, steps = static_results(traces, cost)
    np.testing.assert_allclose(seconds, [0.06, 0.05])
    assert list(steps) == [4, 2] and best_static(traces, cost)[0] == 1


def test_policy_sees_features_and_hold():
    traces = synthetic_traces([chain(1), chain(4)], num_generations=2, positions=30, hidden_size=2)
    cost = load_cost_model("cpu-smollm2-135m")
    calls = []
    res = simulate(traces, cost, lambda obs: calls.append(obs) or 1, batch=8, hold=3)
    assert res.action_counts[0] == 0
    # asked every 3rd step: ceil(steps / 3) per generation, two generations
    assert res.steps / 3 <= len(calls) <= res.steps / 3 + 2
    assert calls[0].shape == (6 + 2,) and calls[0][-2] == pytest.approx(np.log2(8) / 6)


def brute_force_best_rate(acc, costs):
    P = acc.shape[0]
    best = 0.0
    for plan in itertools.product(range(acc.shape[1]), repeat=P):  # an action per position
        p = tokens = seconds = 0
        while p < P:
            gain = min(acc[p, plan[p]] + 1, P - p)
            tokens, seconds, p = tokens + gain, seconds + costs[plan[p]], p + gain
        best = max(best, tokens / seconds)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_oracle_is_exact_optimum(seed):
    rng = np.random.default_rng(seed)
    acc = np.stack([rng.integers(0, 2, 7), rng.integers(0, 4, 7)], axis=1)
    traces = table(acc.tolist())
    cost = fixed_cost([rng.uniform(0.005, 0.02), rng.uniform(0.001, 0.01)])
    costs = cost.action_costs(ACTIONS)
    assert oracle(traces, cost).tokens_per_s == pytest.approx(brute_force_best_rate(acc, costs))


def test_oracle_bounds_everything_and_static_shrinks_with_load():
    actions = [chain(1), chain(2), chain(4), TreeShape(8, 3, 4), TreeShape(32, 6, 8), EAGLE3_DEFAULT]
    traces = synthetic_traces(actions, num_generations=3, positions=80, hidden_size=2, seed=2)
    cost = load_cost_model("cpu-smollm2-135m")
    s1, s64 = summary(traces, cost, 1), summary(traces, cost, 64)
    for s in (s1, s64):
        assert s["oracle"] >= s["best_static"]["tokens_per_s"] >= s["eagle3_default"]
    # a heavier batch makes verified tokens dearer: the best static tree gets smaller
    big = {str(a): a.total_tokens for a in actions}
    assert big[s64["best_static"]["action"]] < big[s1["best_static"]["action"]]


def test_no_drafts_gains_one_token_per_step():
    traces = synthetic_traces([chain(1), chain(3)], num_generations=2, positions=40).with_no_drafts()
    cost = load_cost_model("cpu-smollm2-135m")
    res = simulate(traces, cost, traces.actions.index(NO_DRAFTS), batch=8)
    assert res.tokens == res.steps == sum(g.num_positions for g in traces.generations)
    # it beats drafting only by what verification saves, never no speculation itself
    assert res.tokens_per_s < summary(traces, cost, 8)["no_speculation"]


def test_load_gate_drafts_only_where_the_policy_beats_drafting_nothing():
    traces = synthetic_traces([chain(1), chain(3), NO_DRAFTS], num_generations=4, positions=64, seed=2)
    cost = load_cost_model("cpu-smollm2-135m")  # speculation pays at load 1, not at 64 (design.md §5)
    chain3 = 1
    limit = draft_load_limit(traces, cost, chain3)
    assert limit is not None and 1 <= limit < 64
    for load in GATE_LOADS:
        if load <= limit:
            assert simulate(traces, cost, chain3, load).tokens_per_s > no_speculation_rate(cost, load) * 1.03
        gated = simulate_gated(traces, cost, chain3, load, 1, limit)
        if load <= limit:
            assert gated.tokens_per_s == simulate(traces, cost, chain3, load).tokens_per_s
        else:
            assert gated.tokens_per_s == pytest.approx(no_speculation_rate(cost, load))
            assert gated.acceptance_length == 1.0 and gated.action_counts.sum() == 0
    next_load = min(b for b in GATE_LOADS if b > limit)  # the upward walk stopped at its first loss
    assert simulate(traces, cost, chain3, next_load).tokens_per_s <= no_speculation_rate(cost, next_load) * 1.03
    # drafting costs nothing extra: it pays at every load; drafting nothing never beats holding it
    assert draft_load_limit(traces, CostModel(("step",), np.array([0.01])), chain3) is None
    assert draft_load_limit(traces, cost, 2) == 0
    assert drafts_at(64, None) and drafts_at(4, 4) and not drafts_at(5, 4) and not drafts_at(1, 0)
