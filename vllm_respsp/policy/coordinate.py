"""Batch-coordinated shape choice: the draft passes a step runs are shared by the whole batch.

The drafter grows every tree of a step level by level, one head pass per level for all
requests that still grow (runtime/drafter.py), so a step runs as many passes as its *deepest*
tree. The bandit learned per request, with each request paying `draft_pass * levels / load`:
the share it would pay in a batch where every request chose alike. Chosen independently, one
request's deep chain makes the other load - 1 requests wait for its passes, and that cost is
invisible to each of them.

A bandit's scores are values, not logits: after undoing the standardization of its training
targets (per trained load; the nearest one is used), score[i, a] ≈ g_i(a) - ρ · t_i(a) (tokens
gained minus the reference rate times the request's share of the step's seconds, for the load
the network is told). Adding back the share of draft passes that charged gives each request's
value without them; the step's value when at most L levels run is then

    V(L) = Σ_i max_{a : levels(a) <= L} [score_i(a) + ρ c_pass levels(a) / load] - ρ c_pass L

and the batch takes the L with the highest V (a few candidates; one vectorized pass). A batch
whose requests all want the same depth keeps their choices (the shares add up to the passes);
mixed wishes are settled by what the extra passes cost everyone. At a load of 1 this is the
plain argmax. A confidence-bounded shape counts its depth cap: how deep it grows is known only
after drafting. A PPO actor's scores are logits, so its files carry no `coordination` block and
their choice stays per request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vllm_respsp.policy.cost import StepWork
from vllm_respsp.tree.shape import TreeShape


def action_levels(actions: list[TreeShape]) -> list[int]:
    """Draft-head passes each action runs, as the cost model counts them (`StepWork.levels`)."""
    return [int(StepWork.of(a).levels) for a in actions]


@dataclass(frozen=True)
class Coordination:
    """What a policy file needs to price shared draft passes (field `coordination`).

    loads         the batch loads the bandit was trained at, ascending
    target_mean   per load: the mean of the training targets (tokens) it was standardized by
    target_std    per load: their standard deviation
    rate          per load: the reference rate ρ (batch tokens/s) the targets priced seconds at
    pass_seconds  one draft-head pass over the batch (the cost profile's draft_pass term)
    """

    loads: tuple[int, ...]
    target_mean: tuple[float, ...]
    target_std: tuple[float, ...]
    rate: tuple[float, ...]
    pass_seconds: float

    def to_dict(self) -> dict:
        return {"loads": list(self.loads), "target_mean": list(self.target_mean),
                "target_std": list(self.target_std), "rate": list(self.rate),
                "pass_seconds": self.pass_seconds}

    @classmethod
    def from_dict(cls, raw: dict) -> Coordination:
        """Raises ValueError naming the sub-field."""
        if not isinstance(raw, dict):
            raise ValueError("must be an object with loads, target_mean, target_std, rate, pass_seconds")
        loads = raw.get("loads")
        if not isinstance(loads, list) or not loads or not all(isinstance(b, int) and b >= 1 for b in loads) \
                or loads != sorted(set(loads)):
            raise ValueError(f"loads must be ascending positive integers, got {loads!r}")
        lists = {}
        for key in ("target_mean", "target_std", "rate"):
            v = raw.get(key)
            if not isinstance(v, list) or len(v) != len(loads) or \
                    not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
                raise ValueError(f"{key} must be {len(loads)} finite numbers (one per load), got {v!r}")
            lists[key] = tuple(float(x) for x in v)
        if any(s <= 0 for s in lists["target_std"]) or any(r <= 0 for r in lists["rate"]):
            raise ValueError("target_std and rate must be positive")
        pass_seconds = raw.get("pass_seconds")
        if not isinstance(pass_seconds, (int, float)) or not pass_seconds >= 0:
            raise ValueError(f"pass_seconds must be a number >= 0, got {pass_seconds!r}")
        return cls(tuple(loads), lists["target_mean"], lists["target_std"], lists["rate"],
                   float(pass_seconds))

    def nearest(self, load: int) -> int:
        """Index of the trained load closest to `load` on a log scale."""
        return min(range(len(self.loads)), key=lambda i: abs(math.log2(self.loads[i]) - math.log2(load)))


def coordinated_choice(scores: torch.Tensor, levels: torch.Tensor, coordination: Coordination,
                       load: int) -> torch.Tensor:
    """Action indices [B] for the bandit `scores` [B, A] of one step's requests (see module doc).

    levels: int [A], draft passes per action. Returns the per-request argmax when B == 1.
    """
    if scores.shape[0] <= 1:
        return scores.argmax(dim=-1)
    i = coordination.nearest(load)
    price = coordination.rate[i] * coordination.pass_seconds  # tokens one pass is worth
    levels = levels.to(scores.device)
    values = scores.float() * coordination.target_std[i] + coordination.target_mean[i] \
        + price * levels.float() / load
    caps = torch.unique(levels)  # candidate L, ascending
    allowed = levels[None, :] <= caps[:, None]  # [L, A]
    masked = values[None].masked_fill(~allowed[:, None, :], float("-inf"))  # [L, B, A]
    best, pick = masked.max(dim=-1)  # [L, B]
    step_value = best.sum(dim=-1) - price * caps.float()
    return pick[int(step_value.argmax())]
