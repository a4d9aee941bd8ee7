"""The simulator's side of the engine check: vLLM's acceptance-length convention, policies' views."""

import numpy as np
import pytest
import torch

from vllm_respsp.engine_tools.check import policy_view, simulated_acceptance
from vllm_respsp.policy.network import PolicyNet
from vllm_respsp.policy.policy_file import load_policy, save_policy
from vllm_respsp.policy.traces import FeatureSpec, Generation, TraceSet, synthetic_traces
from vllm_respsp.tree.shape import NO_DRAFTS, chain


def test_steps_without_drafts_are_outside_vllms_counters():
    # chain3 at p0 accepts 2 (-> p3); NO_DRAFTS at p3 (-> p4); chain3 accepts 0 at p4; NO_DRAFTS at p5
    accepted = np.array([[2, 0], [0, 0], [0, 0], [1, 0], [0, 0], [0, 0]], dtype=np.int16)
    drafts_here = np.array([[1], [0], [0], [0], [1], [0]], dtype=np.float32)
    traces = TraceSet([chain(3), NO_DRAFTS], [FeatureSpec("f", 1)],
                      [Generation("p", "s", drafts_here, accepted)]).validate()
    policy = lambda obs: 0 if obs[0] > 0.5 else 1  # noqa: E731
    assert simulated_acceptance(traces, policy) == pytest.approx((3 + 1) / 2)
    assert simulated_acceptance(traces, 0) == pytest.approx(6 / 3)  # p0 +3, p3 +2, p5 +1
    assert simulated_acceptance(traces, 1) == 1.0  # vLLM's acceptance length without any draft


def test_policy_view_follows_the_policy_files_blocks_and_action_order(tmp_path):
    traces = synthetic_traces([chain(1), chain(3)], num_generations=2, positions=20, hidden_size=4)
    actions = [NO_DRAFTS, chain(3), chain(1)]
    net = PolicyNet(traces.feature_dim, 2, len(actions), proj_dim=4, hidden=(8,))
    pf = load_policy(save_policy(tmp_path / "p", net, actions, traces.feature_spec, hold=1))
    view = policy_view(traces, pf)
    assert view.actions == actions
    g, v = traces.generations[0], view.generations[0]
    np.testing.assert_array_equal(v.accepted, np.stack([0 * g.accepted[:, 0], g.accepted[:, 1], g.accepted[:, 0]], 1))
    obs = np.concatenate([v.features[0], [0.0, 0.0]]).astype(np.float32)
    assert pf.net.act(obs) == int(net(torch.as_tensor(obs)[None]).argmax())
