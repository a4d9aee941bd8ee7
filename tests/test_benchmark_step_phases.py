"""benchmarks.step_phases: the configurations it names (its timings are measurements, not tests)."""

import pytest

from benchmarks.step_phases import speculative_config
from vllm_respsp.policy.policy_file import load_policy
from vllm_respsp.tree.shape import chain


def test_configurations_name_their_engines(tmp_path):
    assert speculative_config("none", "HEAD", tmp_path) is None
    assert speculative_config("eagle3-2", "HEAD", tmp_path) == \
        {"method": "eagle3", "model": "HEAD", "num_speculative_tokens": 2}
    assert speculative_config("respsp-chain3", "HEAD", tmp_path)["shape"] == chain(3).to_dict()
    held = speculative_config("held", "HEAD", tmp_path)
    assert held["method"] == "respsp" and load_policy(held["policy"]).max_draft_load == 0  # a shut gate
    policy = speculative_config("policy", "HEAD", tmp_path)
    assert policy["method"] == "respsp" and load_policy(policy["policy"]).actions  # the shipped file


@pytest.mark.parametrize("name", ["eagle3", "eagle3-x", "chain3", "respsp"])
def test_an_unknown_configuration_names_the_allowed_ones(name, tmp_path):
    with pytest.raises(SystemExit, match="allowed are none, held, policy, eagle3-K, respsp-chainK"):
        speculative_config(name, "HEAD", tmp_path)
