"""The draft head's keys/values live in vLLM's paged cache (runtime.head_kv), so vLLM's prefix
cache keeps them: a long prompt sent a second time starts its first step in the prefix cache and
must draft exactly as the first time (real target and shipped head, float32, one engine).

The engine runs in trace-recording mode: every step it drafts, from the real root states, the
tree each action would have proposed, and decodes without speculation. So both requests are
compared root by root (the head's features and its trees) and each action's acceptance length is
read by walking the recorded trees along the output. A head that drafted the second request from
the part of its prompt it computed itself (or from zeros for the cached part) fails both checks.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
from conftest import run_engine

from vllm_respsp.draft import shipped_head_path
from vllm_respsp.engine_tools.record import accepted_lengths
from vllm_respsp.runtime.recorder import read_records
from vllm_respsp.testbed import model as testbed_model

BLOCK = 32  # vLLM's CPU attention takes multiples of 32
TOKENS = 24


def by_request(path):
    """{request: {root position: (features, trees of every pool)}} from a recording, requests in
    the order they first appear."""
    steps = defaultdict(dict)
    for rec in read_records(path):
        tokens, parents, depths, _, cu = rec["trees"]
        n = len(rec["pools"])
        for i, req in enumerate(rec["req_ids"]):
            lo, hi = cu[i * n], cu[(i + 1) * n]
            trees = (tokens[lo:hi], parents[lo:hi], depths[lo:hi], cu[i * n:(i + 1) * n + 1] - lo)
            steps[req][rec["root_positions"][i]] = (rec["features"][i], trees)
    return steps


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    from vllm_respsp.draft.evaluate import prompt_token_ids

    target = testbed_model.testbed_model_path()
    prompt = [t for p in prompt_token_ids("humaneval", target, 4) for t in p]  # ~440 tokens: 13 blocks
    tmp = tmp_path_factory.mktemp("head-kv")
    sampling = {"temperature": 0.0, "max_tokens": TOKENS, "ignore_eos": True}
    chain, tree = {"total_tokens": 3, "depth": 3, "top_k": 1}, {"total_tokens": 8, "depth": 3, "top_k": 3}
    job = {"model": str(target), "prompts": [prompt], "samplings": [sampling, sampling],
           "engine": {"dtype": "float32", "max_model_len": 1024, "block_size": BLOCK, "enable_prefix_caching": True},
           "speculative_config": {"method": "respsp", "model": str(shipped_head_path()), "shape": chain,
                                  "actions": [chain, tree]}}
    env = {"VLLM_RESPSP_RECORD": str(tmp / "trace.records"), "VLLM_RESPSP_STATS_FILE": str(tmp / "stats.json")}
    first, second = run_engine(job, env=env)["results"]
    return prompt, first, second, by_request(str(tmp / "trace.records")), json.loads((tmp / "stats.json").read_text())


def test_a_prompt_from_the_prefix_cache_drafts_as_the_first_time(recorded):
    prompt, first, second, steps, stats = recorded
    assert len(prompt) > 4 * BLOCK
    assert first["token_ids"] == second["token_ids"]
    assert stats["head_kv"] == "paged" and stats["prefix_cached_requests"] == 1 and not stats["fallbacks"]
    assert len(steps) == 2
    a, b = steps.values()  # in the order they were first recorded
    positions = sorted(a)
    assert positions == sorted(b) == list(range(len(prompt), len(prompt) + TOKENS))
    for pos in positions:
        assert np.allclose(a[pos][0], b[pos][0], rtol=1e-4, atol=1e-4), f"root features differ at {pos}"
        for ours, theirs in zip(a[pos][1], b[pos][1]):
            assert np.array_equal(ours, theirs), f"drafted trees differ at {pos}"

    output = np.array(first["token_ids"][0])
    roots_at = np.arange(TOKENS - 1)  # the last token has nothing after it to accept
    for steps_of in (a, b):
        trees = [steps_of[len(prompt) + j][1] for j in roots_at]
        for pool in range(len(trees[0][3]) - 1):
            one = [_pool_tree(t, pool) for t in trees]
            accepted = np.concatenate([accepted_lengths(t, np.array([j]), output) for t, j in zip(one, roots_at)])
            steps_of.setdefault("acceptance", []).append(1 + accepted.mean())
    assert np.allclose(a["acceptance"], b["acceptance"], rtol=0.02), (a["acceptance"], b["acceptance"])
    assert a["acceptance"][0] > 1.0  # the head really drafted: the comparison is not of empty trees


def _pool_tree(trees, pool):
    tokens, parents, depths, cu = trees
    lo, hi = cu[pool], cu[pool + 1]
    return tokens[lo:hi], parents[lo:hi], depths[lo:hi], np.array([0, hi - lo])
