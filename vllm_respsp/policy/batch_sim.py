"""Trace simulator for a real batch: requests with different shapes share one step.

`simulator.simulate` walks one generation at a time and prices each step as the request's share
of a batch where every request chose alike; that is what training optimizes. A running engine
mixes shapes in a step, and the step runs as many draft passes as its deepest tree
(cost.SHARED_TERMS), so a policy that picks per request can cost more than that share says.
This walk measures it:

- `batch` slots run generations side by side, as vLLM's continuous batching does; a slot whose
  generation ends takes the next one, cycling through the set, so the load stays `batch` (a
  steady state: no draining tail, and sets smaller than the batch still fill it). The walk stops
  once max(set size, 2 * batch) generations have finished, so every generation is walked whole
  at least once and the ones cut off at the end are a minority.
- Every step, each live slot's action comes from `chooser(features [n, F], recent [n], load)`
  (or a fixed action index); each slot gains its recorded accepted length + 1 and the step
  costs `cost.batch_step_seconds` of the slots' work at their positions.
- Acceptance at temperature 0 stays exact (a request's accepted length depends only on its own
  tree); only the cost couples the requests.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch

from vllm_respsp.policy.cost import CostModel, StepWork
from vllm_respsp.policy.simulator import SimResult, update_recent
from vllm_respsp.policy.traces import WORK_FIELDS, TraceSet

Chooser = Callable[[np.ndarray, np.ndarray, int], np.ndarray]  # (features, recent, load) -> actions


def policy_chooser(shape_policy) -> Chooser:
    """The in-engine ShapePolicy's own batched forward (coordination included) as a chooser.

    The engine turns a failed call into its static fallback shape; a simulation must not
    (the index would read as an action), so a fallback here is an error."""
    def choose(features: np.ndarray, recent: np.ndarray, load: int) -> np.ndarray:
        before = shape_policy.fallback_count
        actions = shape_policy.forward(torch.as_tensor(features), torch.as_tensor(recent), load).numpy()
        if shape_policy.fallback_count != before or (actions < 0).any():
            raise ValueError("the policy fell back to its static shape in simulation; do the traces "
                             "hold the features it was trained on (policy.train --features)?")
        return actions
    return choose


def simulate_batch(traces: TraceSet, cost: CostModel, chooser: int | Chooser, batch: int,
                   context: int | None = None) -> SimResult:
    """tokens/s of `chooser` when `batch` requests at a time share every step (module doc)."""
    gens = traces.generations
    works = [g.action_work(traces.actions) for g in gens]
    finish_after = max(len(gens), 2 * batch)
    finished = 0
    following = itertools.cycle(range(len(gens)))
    slots: list[list] = []  # [generation index, position, recent acceptance]
    counts = np.zeros(traces.num_actions, dtype=np.int64)
    tokens = seconds = 0.0
    drafted = 0
    while finished < finish_after:
        while len(slots) < batch:
            slots.append([next(following), 0, 0.0])
        if callable(chooser):
            features = np.stack([gens[g].features[p] for g, p, _ in slots]).astype(np.float32)
            recent = np.array([r for _, _, r in slots], dtype=np.float32)
            actions = np.asarray(chooser(features, recent, batch), dtype=np.int64).reshape(batch)
        else:
            actions = np.full(batch, int(chooser), dtype=np.int64)
        work = StepWork(*(np.array([getattr(works[g], f)[p, a] for (g, p, _), a in zip(slots, actions)],
                                   dtype=float) for f in WORK_FIELDS))
        seconds += cost.batch_step_seconds(work, context)
        drafted += int((work.nodes > 0).sum())
        for slot, a in zip(slots, actions):
            g, p, recent_accept = slot
            accepted = int(gens[g].accepted[p, a])
            gain = min(accepted + 1, gens[g].num_positions - p)
            tokens += gain
            counts[a] += 1
            slot[1], slot[2] = p + gain, update_recent(recent_accept, accepted)
        live = [s for s in slots if s[1] < gens[s[0]].num_positions]
        finished += len(slots) - len(live)
        slots = live
    # steps are request steps, as vLLM's acceptance length counts them
    return SimResult(tokens, seconds, int(counts.sum()), counts, drafted)
