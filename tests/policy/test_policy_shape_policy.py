"""ShapePolicy: batched argmax equals the simulator's view, persistence, never raises."""

import numpy as np
import pytest
import torch

from vllm_respsp.config import RespspConfig
from vllm_respsp.policy.network import PolicyNet
from vllm_respsp.policy.policy_file import save_policy
from vllm_respsp.policy.shape_policy import FALLBACK, ShapePolicy
from vllm_respsp.policy.simulator import extra_features
from vllm_respsp.policy.traces import FeatureSpec
from vllm_respsp.tree.shape import NO_DRAFTS, TreeShape, chain

ACTIONS = [chain(1), chain(2), chain(4), TreeShape(8, 3, 4), TreeShape(16, 5, 4)]
F = 12
FALLBACK_SHAPE = TreeShape(6, 3, 2)


def make_policy(hold=1, seed=0):
    torch.manual_seed(seed)
    net = PolicyNet(F, 2, len(ACTIONS), proj_dim=8, hidden=(32,))
    with torch.no_grad():
        net.head.weight.mul_(20)  # spread the argmax over actions
    return ShapePolicy(net, ACTIONS, FALLBACK_SHAPE, hold)


def test_batched_call_matches_single_observations():
    policy = make_policy()
    feats, recent = torch.randn(64, F), torch.rand(64) * 3
    idx = policy(feats, recent, batch_load=64)
    assert idx.shape == (64,) and idx.dtype == torch.int64
    single = [policy.net.act(np.concatenate([feats[i].numpy(), extra_features(64, float(recent[i]), 5)]))
              for i in range(64)]
    assert idx.tolist() == single
    assert len(set(single)) > 1


def test_hold_counters_are_per_request():
    policy = make_policy(hold=3)
    calls = []
    real_forward = policy.forward
    policy.forward = lambda f, r, b: calls.append(len(f)) or real_forward(f, r, b)
    feats, recent = torch.randn(2, F), torch.zeros(2)
    first = policy.choose(["a", "b"], feats, recent)
    for _ in range(2):  # held: no new decision even with different features
        assert policy.choose(["a", "b"], torch.randn(2, F) * 10, recent) == first
    assert calls == [2]
    policy.choose(["c", "a", "b"], torch.randn(3, F), torch.zeros(3))  # a, b expire; c is new
    assert calls == [2, 3]
    policy.choose(["b", "c"], torch.randn(2, F), torch.zeros(2))
    assert calls == [2, 3]  # both held
    policy.release("b")
    policy.choose(["b", "c"], torch.randn(2, F), torch.zeros(2))
    assert calls == [2, 3, 1]  # only the released request is decided again


def test_nan_rows_fall_back_and_are_counted():
    policy = make_policy()
    feats = torch.randn(4, F)
    feats[1, 3] = float("nan")
    idx = policy(feats, torch.zeros(4), 4)
    assert idx[1] == FALLBACK and (idx[[0, 2, 3]] >= 0).all()
    assert policy.fallback_count == 1
    shapes = policy.choose([0, 1, 2, 3], feats, torch.zeros(4))
    assert shapes[1] == FALLBACK_SHAPE and policy.fallback_count == 2


@pytest.mark.parametrize("bad", [torch.randn(3, F + 5), "not a tensor", torch.randn(3, F, 2)])
def test_errors_fall_back_and_never_raise(bad):
    policy = make_policy()
    shapes = policy.choose(["x", "y", "z"], bad, torch.zeros(3))
    assert shapes == [FALLBACK_SHAPE] * 3 and policy.fallback_count == 3


def test_from_file_uses_config_fallback_and_checks_width(tmp_path):
    net = make_policy().net
    path = save_policy(tmp_path / "p", net, ACTIONS, [FeatureSpec("eagle3_fused", F)],
                       target={"hidden_size": 4})
    config = RespspConfig(model="m", shape=FALLBACK_SHAPE, actions=tuple(ACTIONS))
    policy = ShapePolicy.from_file(path, config, hidden_size=4, feature_dims={"eagle3_fused": F})
    assert policy.fallback == FALLBACK_SHAPE and policy.hold == 1
    feats = torch.randn(7, F)
    assert policy(feats, torch.zeros(7), 7).tolist() == make_policy().net(
        torch.cat([feats, torch.tensor([[np.log2(7) / 6, 0.0]] * 7, dtype=torch.float32)], 1)).argmax(-1).tolist()


def test_above_the_load_gate_every_request_drafts_nothing_without_the_network():
    policy = make_policy(hold=3)
    policy.max_draft_load = 4
    calls = []
    real_forward = policy.forward
    policy.forward = lambda f, r, b: calls.append(b) or real_forward(f, r, b)
    first = policy.choose(["a", "b"], torch.randn(2, F), torch.zeros(2), batch_load=4)
    assert calls == [4] and policy.held("a") is not None
    # load 5: no network call (no features needed), no fallback, and the holds are dropped
    assert policy.choose(["a", "b"], torch.empty(0), torch.zeros(2), batch_load=5) == [NO_DRAFTS] * 2
    assert calls == [4] and policy.fallback_count == 0
    assert policy.held("a") is None and not policy.drafts_at(5) and policy.drafts_at(4)
    # back under the gate: the network is asked afresh
    again = policy.choose(["a", "b"], torch.randn(2, F), torch.zeros(2), batch_load=1)
    assert calls == [4, 1] and all(s in ACTIONS for s in first + again)
