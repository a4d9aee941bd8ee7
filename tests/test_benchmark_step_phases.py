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


def test_tree_shapes_table_lists_only_the_depths_a_shape_drafts():
    """vLLM keeps an acceptance slot per drafted token (8 for T8/D3/K4); the table shows depths."""
    from benchmarks.tree_shapes import markdown

    row = {"acceptance_length": 1.9, "tok_s": 10.0, "speedup": 0.5, "identical": 1, "prompts": 2,
           "lossless": {"label": "identical"}}
    meta = {"command": "python -m benchmarks.tree_shapes", "date": "2026-12-06", "head": "h",
            "args": {"max_tokens": 8, "prompts": None, "dtype": "float32", "max_num_seqs": None}}
    rows = [{**row, "config": "none", "acceptance_length": None, "per_depth": [], "lossless": None},
            {**row, "config": "T8/D3/K4", "per_depth": [0.5, 0.25, 0.125, 0.0, 0.0, 0.0, 0.0, 0.0]},
            {**row, "config": "cycle:chain2,T4/D4/K1", "per_depth": [0.5, 0.2, 0.1, 0.05, 0.0]}]
    table = markdown(meta, rows).splitlines()
    assert table[-3].startswith("| none | - | - |")
    assert "| 0.50, 0.25, 0.12 |" in table[-2]
    assert "| 0.50, 0.20, 0.10, 0.05 |" in table[-1]
