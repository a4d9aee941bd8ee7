"""The policy shipped for the testbed loads against the shipped head and picks from its actions."""

import json

import torch

from vllm_respsp.draft import shipped_head_path
from vllm_respsp.policy import shipped_policy_if_present
from vllm_respsp.policy.features import feature_dims
from vllm_respsp.policy.policy_file import load_policy
from vllm_respsp.policy.shape_policy import ShapePolicy


def test_shipped_policy_matches_the_shipped_head():
    path = shipped_policy_if_present()
    assert path, "vllm_respsp/assets/policy/ is missing the testbed policy"
    hidden = json.loads((shipped_head_path() / "config.json").read_text())["hidden_size"]
    pf = load_policy(path, hidden_size=hidden, feature_dims=feature_dims(hidden))
    assert pf.meta["cost_profile"]["name"] == "cpu-smollm2-135m-measured"
    policy = ShapePolicy.from_file(path, feature_dims=feature_dims(hidden))
    width = sum(f.dim for f in pf.feature_spec)
    confident = torch.tensor([[0.95] + [0.005] * 7])[:, :width]
    unsure = torch.tensor([[0.2, 0.15, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05]])[:, :width]
    shapes = policy.choose(["a", "b"], torch.cat([confident, unsure]), torch.zeros(2), 1)
    assert all(s in pf.actions for s in shapes) and policy.fallback_count == 0
