"""benchmarks.step_phases: the configurations it names (its timings are measurements, not tests)."""

from types import SimpleNamespace

import pytest

from benchmarks.step_phases import _decode_load, speculative_config
from vllm_respsp.policy.policy_file import load_policy
from vllm_respsp.tree.shape import TreeShape, chain


def test_configurations_name_their_engines(tmp_path):
    assert speculative_config("none", "HEAD", tmp_path) is None
    assert speculative_config("eagle3-2", "HEAD", tmp_path) == \
        {"method": "eagle3", "model": "HEAD", "num_speculative_tokens": 2}
    assert speculative_config("respsp-chain3", "HEAD", tmp_path)["shape"] == chain(3).to_dict()
    assert speculative_config("respsp-T8/D3/K4@2", "HEAD", tmp_path)["shape"] == TreeShape(8, 3, 4).to_dict()
    assert speculative_config("eagle3-2@2", "HEAD", tmp_path) == speculative_config("eagle3-2", "HEAD", tmp_path)
    held = speculative_config("held", "HEAD", tmp_path)
    assert held["method"] == "respsp" and load_policy(held["policy"]).max_draft_load == 0  # a shut gate
    policy = speculative_config("policy", "HEAD", tmp_path)
    assert policy["method"] == "respsp" and load_policy(policy["policy"]).actions  # the shipped file


@pytest.mark.parametrize("name", ["eagle3", "eagle3-x", "chain3", "respsp"])
def test_an_unknown_configuration_names_the_allowed_ones(name, tmp_path):
    with pytest.raises(SystemExit, match="allowed are none, held, policy, eagle3-K and respsp-SHAPE"):
        speculative_config(name, "HEAD", tmp_path)


def test_a_bad_respsp_shape_names_the_forms_it_reads(tmp_path):
    with pytest.raises(SystemExit, match=r"'respsp-T8/D3'.*expected chainN, T<total_tokens>/D<depth>/K<top_k>"):
        speculative_config("respsp-T8/D3", "HEAD", tmp_path)


def schedule(tokens: dict, spec: dict, new=()):
    """The fields of vLLM's SchedulerOutput that `_decode_load` reads."""
    return SimpleNamespace(num_scheduled_tokens=tokens, scheduled_spec_decode_tokens=spec, scheduled_new_reqs=list(new))


def test_decode_steps_are_told_from_steps_with_prompt_tokens():
    assert _decode_load(schedule({"a": 2, "b": 1}, {"a": [5]})) == 2  # a verifies one draft, b none
    assert _decode_load(schedule({"a": 2, "b": 7}, {"a": [5]})) == 0  # b runs a prompt chunk
    assert _decode_load(schedule({"a": 1}, {}, new=["c"])) == 0  # a request joins
