"""Policy files: round trip, and load-time errors that name the field."""

import json

import pytest
import torch

from vllm_respsp.config import RespspConfig
from vllm_respsp.policy.network import PolicyNet
from vllm_respsp.policy.policy_file import PolicyFileError, load_policy, save_policy
from vllm_respsp.policy.traces import FeatureSpec
from vllm_respsp.tree.shape import TreeShape, chain

ACTIONS = [chain(1), chain(3), TreeShape(8, 3, 4)]
SPEC = [FeatureSpec("eagle3_fused", 3 * 576)]


@pytest.fixture
def policy_path(tmp_path):
    torch.manual_seed(0)
    net = PolicyNet(3 * 576, 2, len(ACTIONS), proj_dim=8, hidden=(16,))
    return save_policy(tmp_path / "bandit", net, ACTIONS, SPEC, hold=2,
                       target={"name": "smollm2-135m", "hidden_size": 576},
                       cost_profile={"name": "cpu", "digest": "abc"}, training={"algo": "bandit"})


def edit(path, **changes):
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def test_round_trip(policy_path):
    pf = load_policy(policy_path, hidden_size=576, feature_dims={"eagle3_fused": 1728})
    assert pf.actions == ACTIONS and pf.hold == 2 and pf.feature_spec == SPEC
    assert pf.meta["training"]["algo"] == "bandit"
    x = torch.randn(5, 1728 + 2)
    again = load_policy(policy_path).net
    torch.testing.assert_close(pf.net(x), again(x))


def test_wrong_hidden_size(policy_path):
    with pytest.raises(PolicyFileError, match="'target.hidden_size': a policy trained for hidden "
                                              "size 576 loaded for a target of hidden size 4096"):
        load_policy(policy_path, hidden_size=4096)


def test_wrong_feature_width(policy_path):
    with pytest.raises(PolicyFileError, match="feature_spec.eagle3_fused.*width 1728.*12288"):
        load_policy(policy_path, feature_dims={"eagle3_fused": 12288})


def test_action_set_must_match_config(policy_path):
    same = RespspConfig(model="m", actions=tuple(reversed(ACTIONS)))
    assert load_policy(policy_path, config=same).actions == ACTIONS  # order: the file's
    other = RespspConfig(model="m", actions=(chain(1), chain(4)))
    with pytest.raises(PolicyFileError, match=r"'actions'.*policy only: \['T3/D3/K1', "
                                              r"'T8/D3/K4'\]; in the config only: \['T4/D4/K1'\]"):
        load_policy(policy_path, config=other)


def test_unknown_version(policy_path):
    edit(policy_path, version=7)
    with pytest.raises(PolicyFileError, match="'version': unknown version 7"):
        load_policy(policy_path)


def test_architecture_inconsistent_with_actions(policy_path):
    meta = json.loads(policy_path.read_text())
    edit(policy_path, actions=meta["actions"][:2])
    with pytest.raises(PolicyFileError, match="architecture.num_actions"):
        load_policy(policy_path)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_weights(policy_path, damage):
    weights = policy_path.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PolicyFileError, match="weights.sha256"):
        load_policy(policy_path)


def test_truncated_json(policy_path):
    policy_path.write_text(policy_path.read_text()[:50])
    with pytest.raises(PolicyFileError, match="not valid JSON"):
        load_policy(policy_path)


def test_not_a_policy_file(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(PolicyFileError, match="'format'"):
        load_policy(tmp_path / "x.json")


def test_constant_policy_picks_its_shape_for_every_request(tmp_path):
    from vllm_respsp.policy.policy_file import constant_policy
    from vllm_respsp.policy.shape_policy import ShapePolicy
    from vllm_respsp.tree.shape import NO_DRAFTS, chain

    path = constant_policy(tmp_path / "none", NO_DRAFTS, chain(1))
    assert load_policy(path, feature_dims={"draft_root_probs": 8}).actions == [chain(1), NO_DRAFTS]
    policy = ShapePolicy.from_file(path)
    shapes = policy.choose(list(range(16)), torch.rand(16, 8), torch.rand(16) * 3, batch_load=16)
    assert shapes == [NO_DRAFTS] * 16 and policy.fallback_count == 0
    assert policy.max_draft_load == 0 and not policy.drafts_at(1)  # the gate's step, at every load
    drafting = ShapePolicy.from_file(constant_policy(tmp_path / "c1", chain(1), chain(1)))
    assert drafting.actions == [chain(1)] and drafting.max_draft_load is None


def test_max_draft_load_round_trips_and_is_checked(policy_path):
    assert load_policy(policy_path).max_draft_load is None  # absent: no load gate
    for value in (0, 8):
        edit(policy_path, max_draft_load=value)
        assert load_policy(policy_path).max_draft_load == value
    for bad in (-1, 2.5, "8", True):
        edit(policy_path, max_draft_load=bad)
        with pytest.raises(PolicyFileError, match="'max_draft_load': must be null or an integer >= 0"):
            load_policy(policy_path)
