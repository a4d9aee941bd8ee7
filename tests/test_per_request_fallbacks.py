"""Only the requests that need vLLM's own sampler fall back to chains; the rest of the batch keeps
its trees. Seeds cost nothing: at temperature 0 they change nothing, above it a seeded request
samples its tree with its own generator and stays reproducible."""

import json

import pytest
import torch
from conftest import requests_with_and_without, run_requests

TREE = {"total_tokens": 8, "depth": 4, "top_k": 2}


def greedy(prompt, n, **extra):
    return {"prompt": prompt, "sampling": {"temperature": 0.0, "max_tokens": n, "ignore_eos": True, **extra}}


@pytest.fixture(scope="module")
def runs(fixture_models, tmp_path_factory):
    stats = tmp_path_factory.mktemp("per-request") / "stats.json"
    one_logprobs = [greedy([10 * i + 3], 16) for i in range(7)] + [greedy([90], 16, logprobs=2)]
    seeded_greedy = [greedy([5 * i + 1], 16, seed=0) for i in range(4)]
    job = {"model": str(fixture_models["successor"]), "phases": [one_logprobs, seeded_greedy],
           "engine": {"dtype": "float32", "max_model_len": 256, "max_num_seqs": 8}}
    spec = {"method": "respsp", "model": str(fixture_models["successor_head"]), "shape": TREE}
    return requests_with_and_without(job, spec, stats)


def test_one_request_with_logprobs_does_not_take_the_trees_of_the_other_seven(runs):
    plain, respsp, stats = runs
    assert respsp["phases"] == plain["phases"]  # tokens and logprobs
    # the logprobs request drafted a chain of its depth at each of its steps, every other
    # request its tree; only the logprobs request's steps are counted as fallbacks
    shapes, fallbacks = stats["shapes"], stats["fallbacks"]
    assert shapes["T4/D4/K1"] == fallbacks["chain_for_logprobs"] > 0
    assert shapes["T8/D4/K2"] > 7 * shapes["T4/D4/K1"] * 0.9
    assert set(fallbacks) == {"chain_for_logprobs"}  # seeds at temperature 0 cost nothing


def test_seeded_sampling_keeps_trees_and_is_reproducible(tmp_path):
    from vllm_respsp.testbed.fixtures import successor_eagle3_head, successor_llama

    target = successor_llama(tmp_path / "target", margin=4.0)  # the successor about half the time
    # A decoy head ranks two tokens far above the rest: its top-2 children are never a near-tie
    # whose order could depend on the batch, so the same request drafts the same trees.
    head = successor_eagle3_head(tmp_path / "head", target, decoy=3)
    seeded = [{"prompt": [5 + i], "sampling": {"temperature": 0.8, "seed": 100 + i, "max_tokens": 20,
                                               "ignore_eos": True}} for i in range(4)]
    unseeded = [{"prompt": [50], "sampling": {"temperature": 0.8, "max_tokens": 20, "ignore_eos": True}}]
    stats = tmp_path / "stats.json"
    # The same seeded requests beside an unseeded one, alone, and again beside it. One-token
    # prompts that join running requests get vLLM's -1 placeholder drafts; alone they do not.
    job = {"model": str(target), "phases": [seeded + unseeded, seeded, seeded + unseeded],
           "engine": {"dtype": "float32", "max_model_len": 128, "max_num_seqs": 8},
           "speculative_config": {"method": "respsp", "model": str(head), "shape": TREE}}
    result = run_requests(job, env={"VLLM_RESPSP_STATS_FILE": str(stats)})
    first, second, third = (phase["token_ids"][:4] for phase in result["phases"])
    assert first == second == third  # the same seeds, the same tokens, whatever the batch
    assert len({tuple(t[0]) for t in first}) == 4 and any(t[0] != list(range(6 + i, 26 + i)) for i, t in
                                                           enumerate(first))  # really sampled
    stats = json.loads(stats.read_text())
    assert set(stats["shapes"]) == {"T8/D4/K2"} and not stats["fallbacks"]


def test_a_seeded_row_samples_what_vllms_own_sampler_samples():
    """Whichever sampler handles a seeded request's step (vLLM's in a step without trees, the
    tree sampler otherwise) draws the same token from the same generator state."""
    from vllm.v1.sample.sampler import Sampler

    from vllm_respsp.runtime.sampler import seeded_sampler_of

    vllm_sampler = Sampler()
    seeded = seeded_sampler_of(vllm_sampler)
    logits = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 3
    theirs_g = {r: torch.Generator().manual_seed(r) for r in range(64)}
    ours_g = {r: torch.Generator().manual_seed(r) for r in range(64)}
    theirs, _ = vllm_sampler.topk_topp_sampler(logits.clone(), theirs_g, None, None)
    ours = [seeded(logits[r].softmax(-1), ours_g[r]) for r in range(64)]
    assert theirs.tolist() == ours
    assert len(set(ours)) > 32  # really sampled, not the argmax
    assert all(torch.equal(theirs_g[r].get_state(), ours_g[r].get_state()) for r in range(64))
