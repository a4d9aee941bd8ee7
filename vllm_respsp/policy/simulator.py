"""Exact trace simulator (design.md §6) and the baselines a learned policy is measured against.

A request at position p that uses action a gains g = min(A[p, a] + 1, P - p) tokens (its
accepted draft tokens plus the bonus token, clipped at the end of the recorded text), pays t[p,
a] = its share of the step's modelled seconds at the batch load for the work that action does
there (cost.CostModel.work_seconds: a static shape's work is the same everywhere, a confidence-
bounded shape's is whatever tree the draft's scores gave at p), and moves to p + g. Throughput
= Σ g / Σ t over all generations: the modelled batch tokens/s when every request in the batch
behaves like the simulated one.

The oracle is exact, not greedy. Greedy per-step max g/t is myopic (it ignores where a step
lands) and so is neither optimal nor a bound. Maximizing a ratio Σg/Σt over paths is solved by
Dinkelbach's parametric search: for a rate r, a backward DP over positions maximizes
Σ(g - r t); the best path's own rate is the next r; the iteration stops when the optimum of
Σ(g - r t) is 0, and r is then the highest tokens/s any choice of actions reaches on these
traces. It is the upper bound for every policy, held actions included.

The load gate (`draft_load_limit`): above some batch load no action pays on a given machine,
NO_DRAFTS included when it is decided every step (its root pass gives the policy its features).
A policy file then carries `max_draft_load`, the largest load at which the policy, simulated
here, beats no speculation; above it the engine's ShapePolicy holds every request on NO_DRAFTS
without running the head or the network, so the step costs what a step without speculation
costs (`cost.StepWork.held`: the head restarts from the drafter's window of deferred positions
when the load falls again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vllm_respsp.policy.cost import CostModel
from vllm_respsp.policy.traces import Generation, TraceError, TraceSet
from vllm_respsp.tree.shape import EAGLE3_DEFAULT, TreeShape

# Extra observation entries after the trace features; the same code builds them in the
# simulator, the gym env and the in-engine ShapePolicy, so training and serving agree.
EXTRA_FEATURES = ("batch_load_log2", "recent_accept")
RECENT_DECAY = 0.5  # EMA of accepted draft tokens: mostly the last 1-3 steps


def extra_features(batch: int, recent_accept: float, max_depth: int) -> np.ndarray:
    return np.array([np.log2(batch) / 6.0, recent_accept / max_depth], dtype=np.float32)


def update_recent(recent_accept: float, accepted: int) -> float:
    return RECENT_DECAY * recent_accept + (1 - RECENT_DECAY) * accepted


Policy = int | Callable[[np.ndarray], int]  # a fixed action, or observation -> action


@dataclass
class SimResult:
    tokens: float
    seconds: float
    steps: int
    action_counts: np.ndarray  # [num_actions] steps taken with each action
    drafted_steps: int = 0  # steps that verified at least one draft node (vLLM's "drafts")

    @property
    def tokens_per_s(self) -> float:
        return float(self.tokens / self.seconds)

    @property
    def acceptance_length(self) -> float:
        """Tokens per step (accepted draft tokens + 1), as vLLM's metric defines it."""
        return float(self.tokens / self.steps)

    def histogram(self, actions: list[TreeShape]) -> dict[str, int]:
        return {str(actions[i]): int(c) for i, c in enumerate(self.action_counts) if c}


def step_costs(traces: TraceSet, g: Generation, cost: CostModel, batch: int = 1,
               context: int | None = None) -> np.ndarray:
    """float [P, num_actions]: a request's seconds for each action at each position of `g`."""
    return cost.work_seconds(g.action_work(traces.actions), batch, context)


def simulate(traces: TraceSet, cost: CostModel, policy: Policy, batch: int = 1, hold: int = 1,
             context: int | None = None) -> SimResult:
    """Walk every generation with `policy`, which is asked again every `hold` steps."""
    max_depth = max(a.depth for a in traces.actions)
    counts = np.zeros(traces.num_actions, dtype=np.int64)
    tokens = seconds = 0.0
    steps = drafted = 0
    for g in traces.generations:
        costs = step_costs(traces, g, cost, batch, context)
        nodes = g.action_work(traces.actions).nodes
        P, pos, recent, held, action = g.num_positions, 0, 0.0, 0, 0
        while pos < P:
            if held == 0:
                if callable(policy):
                    obs = np.concatenate([g.features[pos], extra_features(batch, recent, max_depth)])
                    action = int(policy(obs))
                else:
                    action = int(policy)
                held = hold
            held -= 1
            accepted = int(g.accepted[pos, action])
            gain = min(accepted + 1, P - pos)
            tokens += gain
            seconds += costs[pos, action]
            counts[action] += 1
            steps += 1
            drafted += int(nodes[pos, action] > 0)
            pos += gain
            recent = update_recent(recent, accepted)
    return SimResult(tokens, seconds, steps, counts, drafted)


def static_results(traces: TraceSet, cost: CostModel, batch: int = 1,
                   context: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every fixed action at once: (tokens, seconds, steps) per action, walked in lockstep."""
    n = traces.num_actions
    tokens, seconds, steps = np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int64)
    cols = np.arange(n)
    for g in traces.generations:
        costs = step_costs(traces, g, cost, batch, context)
        P = g.num_positions
        pos = np.zeros(n, dtype=np.int64)
        while (live := pos < P).any():
            at = np.minimum(pos, P - 1)
            gain = np.minimum(g.accepted[at, cols].astype(np.int64) + 1, P - pos)
            gain = np.where(live, gain, 0)
            tokens += gain
            seconds += np.where(live, costs[at, cols], 0.0)
            steps += live
            pos += gain
    return tokens, seconds, steps


def best_static(traces: TraceSet, cost: CostModel, batch: int = 1, context: int | None = None,
                kind: str = "any") -> tuple[int, float]:
    """The fixed action with the highest tokens/s on `traces` (tune on training traces only).

    kind: "any" action, "static" (a static shape or NO_DRAFTS: what serving without a policy
    can do) or "bounded" (one shape with a /p or /v bound for every step)."""
    tokens, seconds, _ = static_results(traces, cost, batch, context)
    rates = tokens / seconds
    keep = np.array([kind == "any" or (kind == "bounded") == a.bounded for a in traces.actions])
    if not keep.any():
        raise ValueError(f"no {kind} action among {list(map(str, traces.actions))}")
    best = int(np.argmax(np.where(keep, rates, -np.inf)))
    return best, float(rates[best])


def eagle3_default_rate(traces: TraceSet, cost: CostModel, batch: int = 1,
                        context: int | None = None) -> float | None:
    """tokens/s of EAGLE-3's default tree (60 nodes, depth 8 here, top-k 10) for every step, if
    the traces hold it or pools that cover it."""
    try:
        with_default = traces.with_actions([EAGLE3_DEFAULT])
    except TraceError:
        return None
    return simulate(with_default, cost, 0, batch, context=context).tokens_per_s


def no_speculation_rate(cost: CostModel, batch: int = 1, context: int | None = None) -> float:
    return 1.0 / cost.request_seconds(None, batch, context)


GATE_LOADS = (1, 2, 4, 8, 16, 32, 64, 128)


def draft_load_limit(traces: TraceSet, cost: CostModel, policy: Policy, hold: int = 1,
                     loads=GATE_LOADS, margin: float = 0.03) -> int | None:
    """The policy file's `max_draft_load` (module doc): the largest of `loads`, walked upward,
    up to which the simulated policy beats no speculation by more than `margin` at every load
    (a margin because the simulator is a model: a near tie is not worth the risk); 0 when it
    does not even at the first load, None when it does at every load tried."""
    limit = 0
    for load in sorted(loads):
        rate = simulate(traces, cost, policy, load, hold).tokens_per_s
        if rate <= no_speculation_rate(cost, load) * (1 + margin):
            return limit
        limit = load
    return None


def drafts_at(load: int, max_draft_load: int | None) -> bool:
    """Whether a policy with this `max_draft_load` asks its network at this batch load."""
    return max_draft_load is None or load <= max_draft_load


def simulate_gated(traces: TraceSet, cost: CostModel, policy: Policy, batch: int, hold: int,
                   max_draft_load: int | None, context: int | None = None) -> SimResult:
    """`simulate`, with the load gate: above `max_draft_load` every position is a held
    NO_DRAFTS step (one token at no speculation's cost, `StepWork.held`; no action counted)."""
    if drafts_at(batch, max_draft_load):
        return simulate(traces, cost, policy, batch, hold, context)
    positions = sum(g.num_positions for g in traces.generations)
    seconds = positions / no_speculation_rate(cost, batch, context)
    return SimResult(positions, seconds, positions, np.zeros(traces.num_actions, dtype=np.int64))


def _best_path(accepted: np.ndarray, costs: np.ndarray, rate: float) -> tuple[float, float, np.ndarray]:
    """Backward DP maximizing Σ(g - rate·t) over one generation (costs [P, A]); returns its
    tokens, seconds, counts."""
    P, n = accepted.shape
    value = np.zeros(P + 1)
    choice = np.zeros(P, dtype=np.int64)
    for p in range(P - 1, -1, -1):
        gain = np.minimum(accepted[p].astype(np.int64) + 1, P - p)
        q = gain - rate * costs[p] + value[p + gain]
        choice[p] = int(np.argmax(q))
        value[p] = q[choice[p]]
    tokens = seconds = 0.0
    counts = np.zeros(n, dtype=np.int64)
    p = 0
    while p < P:
        a = choice[p]
        gain = min(int(accepted[p, a]) + 1, P - p)
        tokens, seconds = tokens + gain, seconds + costs[p, a]
        counts[a] += 1
        p += gain
    return tokens, seconds, counts


def oracle(traces: TraceSet, cost: CostModel, batch: int = 1, context: int | None = None,
           tol: float = 1e-9, max_iter: int = 50) -> SimResult:
    """Exact best tokens/s over all per-position action choices (Dinkelbach; see module doc)."""
    costs = [step_costs(traces, g, cost, batch, context) for g in traces.generations]
    _, rate = best_static(traces, cost, batch, context)  # a feasible start: r only rises
    result = None
    for _ in range(max_iter):
        parts = [_best_path(g.accepted, c, rate) for g, c in zip(traces.generations, costs)]
        tokens = sum(p[0] for p in parts)
        seconds = sum(p[1] for p in parts)
        counts = np.sum([p[2] for p in parts], axis=0)
        result = SimResult(tokens, seconds, int(counts.sum()), counts)
        if result.tokens_per_s <= rate * (1 + tol):
            break
        rate = result.tokens_per_s
    return result


def summary(traces: TraceSet, cost: CostModel, batch: int, policy: Policy | None = None,
            hold: int = 1) -> dict:
    """tokens/s of the baselines (and `policy` if given) at one batch load, for reports."""
    out = {"batch": batch, "no_speculation": no_speculation_rate(cost, batch)}
    best, rate = best_static(traces, cost, batch, kind="static")
    out["best_static"] = {"action": str(traces.actions[best]), "tokens_per_s": rate}
    default = eagle3_default_rate(traces, cost, batch)
    if default is not None:
        out["eagle3_default"] = default
    out["oracle"] = float(oracle(traces, cost, batch).tokens_per_s)
    if policy is not None:
        res = simulate(traces, cost, policy, batch, hold)
        out["policy"] = {"tokens_per_s": float(res.tokens_per_s),
                         "acceptance_length": float(res.acceptance_length),
                         "actions": res.histogram(traces.actions)}
    return out
