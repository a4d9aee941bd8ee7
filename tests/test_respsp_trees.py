"""respsp trees in real vLLM: lossless greedy and sampled decoding, mixed shapes (and requests
that draft nothing) in one batch, per-request verification budgets, and the output distribution
at temperature 0.8."""

import json

from conftest import TINY_TREE, marginals_p_value, run_engine, sample_first_tokens

from vllm_respsp.engine_tools.profile import decode_steps

CHAIN4 = {"total_tokens": 4, "depth": 4, "top_k": 1}
SMALL_TREE = {"total_tokens": 12, "depth": 4, "top_k": 3}
BIG_TREE = {"total_tokens": 64, "depth": 4, "top_k": 8}
NO_DRAFTS = {"total_tokens": 0, "depth": 0, "top_k": 0}
# expands only nodes the draft is sure of (the successor head's are, its siblings not): 3 per
# level are drafted, so 12 nodes are verified of the 20 allowed
BOUNDED_TREE = {"total_tokens": 20, "depth": 4, "top_k": 3, "min_prob": 0.3}
# policy "cycle" gives request with prompt p the shape actions[sum(p) % 5]
PROMPTS = [[3], [4], [5], [6], [7], [6, 7], [9, 30], [100, 8]]


def test_mixed_trees_are_lossless_and_budgeted_per_request(fixture_models, tmp_path):
    stats_file = tmp_path / "stats.json"
    job = {"model": str(fixture_models["successor"]), "prompts": PROMPTS,
           "samplings": [{"temperature": 0.0, "max_tokens": 40, "ignore_eos": True},
                         {"temperature": 0.8, "max_tokens": 40, "ignore_eos": True}],
           "engine": {"dtype": "float32", "max_model_len": 256},
           "speculative_config": {"method": "respsp", "model": str(fixture_models["successor_head"]),
                                  "policy": "cycle",
                                  "actions": [CHAIN4, SMALL_TREE, BIG_TREE, NO_DRAFTS, BOUNDED_TREE]}}
    clock = tmp_path / "steps"
    run = run_engine(job, env={"VLLM_RESPSP_STATS_FILE": str(stats_file), "VLLM_RESPSP_STEP_TIMES": str(clock)})
    results = run["results"]
    expected = [[(p[-1] + 1 + i) % 128 for i in range(40)] for p in PROMPTS]
    for r in results:
        assert r["token_ids"] == expected
        spec = r["spec"]
        # the successor head is always right: every step that drafts accepts a whole root path
        # of depth 4 (a request given NO_DRAFTS verifies its bonus token alone, no draft counted)
        assert spec["accepted_tokens"] >= 0.9 * 4 * spec["drafts"]
        assert spec["acceptance_length"] > 4.5
    stats = json.loads(stats_file.read_text())
    assert set(stats["shapes"]) == {"T4/D4/K1", "T12/D4/K3", "T64/D4/K8", "T0/D0/K0", "T20/D4/K3/p0.3"}
    assert not stats["fallbacks"]
    for shape, total in (("T4/D4/K1", 4), ("T12/D4/K3", 12), ("T64/D4/K8", 64), ("T20/D4/K3/p0.3", 12)):
        scheduled = {int(n): count for n, count in stats["scheduled_drafts"][shape].items()}
        # each request is verified with its own tree: never padded to the batch's largest
        assert max(scheduled) == total and max(scheduled, key=scheduled.get) == total
    # the step clock (engine_tools.profile's timer) saw the model steps of both runs, all requests in
    # each decode step, never more tokens than the largest tree allows
    assert "runner_step_clock" in run["applied_patches"]
    steps = [line.split() for line in clock.read_text().splitlines()]
    assert len(steps) > 2 * 40 / 5 and {int(s[1]) for s in steps} >= {len(PROMPTS)}
    assert len(decode_steps(clock.read_text(), len(PROMPTS), 65)) > 10


def test_sampling_at_temperature_08_keeps_the_target_distribution(soft_pair, no_spec_samples, tmp_path):
    spec = {"method": "respsp", "model": str(soft_pair[1]), "shape": TINY_TREE}
    stats_file = tmp_path / "stats.json"
    samples, counters = sample_first_tokens(soft_pair[0], spec, env={"VLLM_RESPSP_STATS_FILE": str(stats_file)})
    # per-request state is released: after 8,000 requests at most a batch's worth is alive
    stats = json.loads(stats_file.read_text())
    assert stats["live_draft_contexts"] <= 512 and stats["live_proposed_trees"] <= 512
    # the trees were used: drafts accepted at every depth, and many rejected
    assert all(n > 100 for n in counters["accepted_per_pos"][:3])
    assert counters["accepted_tokens"] < 0.5 * counters["draft_tokens"]
    assert marginals_p_value(samples, no_spec_samples, 128) > 0.01


def test_the_distribution_test_catches_a_biased_tree_sampler(soft_pair, no_spec_samples):
    """The same engine and test with a sampler that forgets to remove rejected tokens."""
    spec = {"method": "respsp", "model": str(soft_pair[1]), "shape": TINY_TREE}
    samples, _ = sample_first_tokens(soft_pair[0], spec, env={"RESPSP_TEST_FAULT": "keep_rejected"})
    assert marginals_p_value(samples, no_spec_samples, 128) < 0.01


def test_the_right_path_through_later_siblings_is_accepted_and_compacted(fixture_models, tmp_path):
    """A head whose top draft is always wrong and whose second is right: chains accept nothing,
    trees of top-k 4 that keep every drafted node accept whole paths that run through the second
    child at every level, so verification walks later siblings and compaction moves every
    accepted node. A chain with a verify bound above the decoy's confidence verifies nothing,
    its first draft included: its requests verify only their bonus tokens."""
    job = {"model": str(fixture_models["successor"]), "prompts": PROMPTS[:4],
           "samplings": [{"temperature": 0.0, "max_tokens": 24, "ignore_eos": True}],
           "engine": {"dtype": "float32", "max_model_len": 256},
           "speculative_config": {"method": "respsp", "model": str(fixture_models["decoy_head"]),
                                  "policy": "cycle", "actions": [{"total_tokens": 3, "depth": 3, "top_k": 1},
                                                                 {"total_tokens": 36, "depth": 3, "top_k": 4},
                                                                 {**CHAIN4, "verify_min_prob": 0.99}]}}
    stats_file = tmp_path / "stats.json"
    result = run_engine(job, env={"VLLM_RESPSP_STATS_FILE": str(stats_file)})["results"][0]
    assert result["token_ids"] == [[(p[-1] + 1 + i) % 128 for i in range(24)] for p in PROMPTS[:4]]
    # prompts [3] and [6] draft the chain (never accepted), [4] the tree (paths of 3), [5] the
    # bounded chain (nothing verified)
    per_pos = result["spec"]["accepted_per_pos"]
    assert per_pos[0] > 0 and per_pos[2] > 0.8 * per_pos[0]
    stats = json.loads(stats_file.read_text())
    assert set(stats["shapes"]) == {"T3/D3/K1", "T36/D3/K4", "T4/D4/K1/v0.99"}
    assert stats["shapes"]["T4/D4/K1/v0.99"] > 10 and "T4/D4/K1/v0.99" not in stats["scheduled_drafts"]
    assert stats["scheduled_drafts"]["T3/D3/K1"] and not stats["fallbacks"]
