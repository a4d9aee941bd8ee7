"""respsp's Triton tree backend end to end, without a GPU: vLLM's own GPU attention (TRITON_ATTN)
runs on the CPU platform under TRITON_INTERPRET=1 (tests/engine_hooks), and respsp drafts,
verifies and compacts through `vllm_respsp.backends.triton` on vLLM's paged layout as vLLM's
`triton_reshape_and_cache_flash` writes it.

Interpreted Triton is slow (~30-50 s of generation an engine), so the jobs are small: one engine
for greedy identity over a batch mixing chains, trees and NO_DRAFTS (every step after the first
reads KV that compaction moved), one engine for a small chi-square at temperature 0.8, and two
short ones counting the host reads of a step (respsp's chain against vLLM's EAGLE-3).
"""

import json
import subprocess
import sys

import pytest
from conftest import ENGINE_ENV, REPO, TINY_TREE, marginals_p_value, run_engine, sample_first_tokens

TRITON_ENV = {"TRITON_INTERPRET": "1", "RESPSP_TEST_TRITON_ATTN_ON_CPU": "1", "VLLM_USE_V2_MODEL_RUNNER": "0"}
CHAIN3 = {"total_tokens": 3, "depth": 3, "top_k": 1}
TREE = {"total_tokens": 8, "depth": 3, "top_k": 3}
NO_DRAFTS = {"total_tokens": 0, "depth": 0, "top_k": 0}
PROMPTS = [[3], [4], [5], [6, 7], [9, 30], [100, 8]]  # "cycle": prompt p drafts actions[sum(p) % 3]


def successor_tokens(prompt, n):
    return [(prompt[-1] + 1 + i) % 128 for i in range(n)]


def test_layout_of_triton_attn_as_vllm_writes_it():
    """Our zero-copy K/V views and K|V planes read what vLLM's triton_reshape_and_cache_flash
    wrote into a cache allocated as vLLM allocates TRITON_ATTN's; tree attention through them
    equals the reference on gathered rows, and compaction moves exactly the asked slots."""
    out = subprocess.run([sys.executable, "tests/triton_layout_job.py"], cwd=REPO,
                         env={**ENGINE_ENV, **TRITON_ENV}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().splitlines()[-1] == "layout ok"


@pytest.fixture(scope="module")
def greedy_run(fixture_models, tmp_path_factory):
    stats = tmp_path_factory.mktemp("triton") / "stats.json"
    job = {"model": str(fixture_models["successor"]), "prompts": PROMPTS,
           "samplings": [{"temperature": 0.0, "max_tokens": 16, "ignore_eos": True}],
           "engine": {"dtype": "float32", "max_model_len": 128, "max_num_seqs": 8},
           "speculative_config": {"method": "respsp", "model": str(fixture_models["successor_head"]),
                                  "policy": "cycle", "actions": [CHAIN3, TREE, NO_DRAFTS]}}
    run = run_engine(job, env={**TRITON_ENV, "VLLM_RESPSP_STATS_FILE": str(stats)}, timeout=900)
    return run["results"][0], json.loads(stats.read_text())


def test_mixed_batch_is_identical_to_no_speculation(greedy_run):
    result, stats = greedy_run
    assert result["token_ids"] == [successor_tokens(p, 16) for p in PROMPTS]
    assert stats["tree_backend"] == "TritonTreeBackend" and stats["head_kv"] == "paged"
    assert set(stats["shapes"]) == {"T3/D3/K1", "T8/D3/K3", "T0/D0/K0"} and not stats["fallbacks"]
    # the trees ran through the Triton backend, and whole root paths were accepted
    assert stats["seconds"]["tree_attention"] > 0 and stats["seconds"]["compact_kv"] > 0
    assert result["spec"]["acceptance_length"] > 3.0


def test_sampling_at_temperature_08_keeps_the_target_distribution(soft_pair, no_spec_samples):
    # the reference: the session's samples without speculation (CPU backend, cheap, so many);
    # the interpreted Triton engine is slow per request, so it samples one batch
    spec = {"method": "respsp", "model": str(soft_pair[1]), "shape": TINY_TREE}
    tree, counters = sample_first_tokens(soft_pair[0], spec, n=256, env=TRITON_ENV, timeout=1500)
    assert counters["accepted_per_pos"][0] > 20 and counters["accepted_tokens"] < 0.5 * counters["draft_tokens"]
    assert marginals_p_value(tree, no_spec_samples, 128) > 0.01


def test_a_chain_step_reads_back_no_more_than_vllms_eagle3(fixture_models, tmp_path):
    """Per decode step on vLLM's GPU attention path, respsp drafting a chain of 3 reads values
    back to the host (the calls that wait for a GPU, counted by benchmarks/host_reads.py) no
    more often than vLLM's own EAGLE-3 with 3 drafts, over the whole step: forward, sampling,
    drafting and the drafts' copy to the host."""
    from benchmarks.host_reads import configs, count, summary

    chains = {name: spec for name, spec in configs(str(fixture_models["successor_head"])).items()
              if "chain" in name}
    reads = {name: summary(count(str(fixture_models["successor"]), spec, tmp_path / "reads.jsonl"))
             for name, spec in chains.items()}
    ours, theirs = reads["respsp chain 3 (T3/D3/K1)"], reads["vLLM EAGLE-3 chain 3"]
    assert theirs["by_package"]["vllm"] > 0  # the counter sees the proposer's and sampler's reads
    assert ours["steps"] >= 2 and max(ours["per_step"]) <= min(theirs["per_step"]), reads
