"""The state a shape policy sees for one request at one step, built the same way by the engine
(`runtime.RespspRuntime`) and by the trace recorder (`runtime.recorder`), so a policy trained
on recorded traces reads at serving time exactly the numbers it was trained on.

Every block describes the request at its tree's root (the last verified position), and is
already computed by the drafter before any shape is chosen, so the policy costs no extra pass:

| name                | width        | what it is |
|---------------------|--------------|------------|
| `draft_root_hidden` | hidden size  | the draft head's output state at the root (what level 1 of the tree grows from) |
| `eagle3_fused`      | hidden size  | the head's `fc` over the target's three aux layers at the root: the target's own state |
| `draft_root_probs`  | 8            | the head's 8 largest next-token probabilities at the root, sorted: its confidence |

The extras appended after these (batch load, recent acceptance) are `simulator.EXTRA_FEATURES`.
A policy file's `feature_spec` lists the blocks it was trained on, in order; widths that do not
match the serving head are a load-time error (`policy_file.load_policy(feature_dims=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_respsp.policy.traces import FeatureSpec

ROOT_PROBS = 8
DEFAULT_FEATURES = ("draft_root_hidden", "draft_root_probs")


@dataclass
class RootStates:
    """Per request, at its tree's root: [R, h], [R, h], [R, draft vocab] (log-probs)."""

    fused: torch.Tensor
    hidden: torch.Tensor
    logprobs: torch.Tensor

    def __getitem__(self, index) -> RootStates:
        return RootStates(self.fused[index], self.hidden[index], self.logprobs[index])


def feature_dims(hidden_size: int) -> dict[str, int]:
    return {"draft_root_hidden": hidden_size, "eagle3_fused": hidden_size,
            "draft_root_probs": ROOT_PROBS}


def feature_spec(names, hidden_size: int) -> list[FeatureSpec]:
    dims = feature_dims(hidden_size)
    unknown = [n for n in names if n not in dims]
    if unknown:
        raise ValueError(f"unknown policy feature(s) {unknown}; allowed: {sorted(dims)}")
    return [FeatureSpec(n, dims[n]) for n in names]


def policy_features(spec: list[FeatureSpec], roots: RootStates) -> torch.Tensor:
    """[R, sum of widths] float32, blocks in `spec` order."""
    blocks = []
    for f in spec:
        if f.name == "draft_root_hidden":
            blocks.append(roots.hidden.float())
        elif f.name == "eagle3_fused":
            blocks.append(roots.fused.float())
        elif f.name == "draft_root_probs":
            k = min(f.dim, roots.logprobs.shape[-1])
            top = roots.logprobs.float().topk(k, dim=-1).values.exp()
            blocks.append(torch.nn.functional.pad(top, (0, f.dim - k)))
        else:
            raise ValueError(f"unknown policy feature {f.name!r}")
    return torch.cat(blocks, dim=-1)
