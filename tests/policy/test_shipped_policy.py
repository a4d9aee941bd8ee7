"""Every shipped policy (one per kind of CPU) loads against the shipped head, was trained on its
kind's cost profile, and picks from its actions; the CPU's flags pick the kind."""

import json
from pathlib import Path

import pytest
import torch

from vllm_respsp.draft import shipped_head_path
from vllm_respsp.policy.features import feature_dims
from vllm_respsp.policy.policy_file import load_policy
from vllm_respsp.policy.shape_policy import ShapePolicy
from vllm_respsp.policy.shipped import SHIPPED, cpu_flags, cpu_kind, shipped_policy, shipped_policy_if_present


@pytest.mark.parametrize("kind", sorted(SHIPPED))
def test_shipped_policy_matches_the_shipped_head(kind):
    path = shipped_policy_if_present(kind)
    assert path, f"vllm_respsp/assets/policy/ is missing the testbed policy for {kind} CPUs"
    hidden = json.loads((shipped_head_path() / "config.json").read_text())["hidden_size"]
    pf = load_policy(path, hidden_size=hidden, feature_dims=feature_dims(hidden))
    assert pf.meta["cost_profile"]["name"] == SHIPPED[kind].profile
    policy = ShapePolicy.from_file(path, feature_dims=feature_dims(hidden))
    width = sum(f.dim for f in pf.feature_spec)
    confident = torch.tensor([[0.95] + [0.005] * 7])[:, :width]
    unsure = torch.tensor([[0.2, 0.15, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05]])[:, :width]
    shapes = policy.choose(["a", "b"], torch.cat([confident, unsure]), torch.zeros(2), 1)
    assert all(s in pf.actions for s in shapes) and policy.fallback_count == 0


def test_the_cpu_flags_pick_the_policy(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n\n"
                       "processor\t: 1\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n")
    assert cpu_kind(cpu_flags(cpuinfo)) == "amx"
    assert cpu_kind({"fpu", "avx512f", "avx512_bf16"}) == "avx512"
    assert cpu_kind({"fpu", "avx2"}) == "avx512"  # nearest: drafting costs at least as much
    assert cpu_flags(tmp_path / "absent") == set() and cpu_kind(set()) == "avx512"
    assert shipped_policy("amx").path.parent.name == "smollm2-135m-cpu"
    assert shipped_policy().cpu_kind == cpu_kind()
    with pytest.raises(ValueError, match="allowed"):
        shipped_policy("neon")
    assert Path(shipped_policy("avx512").path).name == "bandit.json"
