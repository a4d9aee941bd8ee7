"""Requests that are empty, structured or need vLLM's own sampler: respsp answers exactly what
the same engine without speculation answers (tokens, logprobs, errors), and each fallback to
vLLM's chains is counted, in the stats file and in the Prometheus counter.

The successor pair (greedy next token t+1, a head that drafts it): requests that follow it accept
whole trees; regexes force tokens off it, so every draft is rejected by the grammar. The token
strings are "w<number>" without spaces to the grammar (a raw vocabulary), so a regex spells a
token sequence as "w5w3w7". Single-digit words keep forced sequences unambiguous ("w5" is no
prefix of "w3"; ids 0-2 are special tokens, not words); many-digit words would let greedy pick a
prefix token (ties at logit 0) into a dead end.
"""

import json

import pytest
from conftest import requests_with_and_without, run_requests

TREE = {"total_tokens": 8, "depth": 4, "top_k": 2}


def greedy(prompt, max_tokens, **extra):
    return {"prompt": prompt, "sampling": {"temperature": 0.0, "max_tokens": max_tokens,
                                           "ignore_eos": True, **extra}}


def structured(prompt, max_tokens, **constraint):
    # no ignore_eos: the grammar ends the output with EOS
    return {"prompt": prompt, "sampling": {"temperature": 0.0, "max_tokens": max_tokens,
                                           "structured_outputs": constraint}}


PHASES = [
    [greedy("", 4)],  # an empty text prompt
    [greedy([], 4)],  # empty token ids
    [greedy([5], 4), greedy("", 4)],  # one empty prompt among good ones
    # max_num_seqs 3: the structured requests join while the first ones decode with trees
    [greedy([10], 24), greedy([40], 12), greedy([70], 30),
     structured([8], 10, choice=["w9w10w11", "w40w41w42"]),  # follows the successor
     structured([20], 10, regex="w5w3w7w4"),  # off it: every draft rejected
     structured([30], 8, regex="(w[0-9]+)+"),  # free, greedy follows the successor
     greedy([60], 10, logprobs=3),
     {"prompt": [90], "sampling": {"temperature": 0.8, "seed": 7, "max_tokens": 10, "ignore_eos": True}},
     greedy([100], 16)],
    [greedy([7], 20), greedy([90], 20)],  # plain again: trees resume
]


@pytest.fixture(scope="module")
def runs(fixture_models, tmp_path_factory):
    stats = tmp_path_factory.mktemp("bad-requests") / "stats.json"
    job = {"model": str(fixture_models["successor"]), "phases": PHASES,
           "engine": {"dtype": "float32", "max_model_len": 256, "max_num_seqs": 3}}
    spec = {"method": "respsp", "model": str(fixture_models["successor_head"]), "shape": TREE}
    return requests_with_and_without(job, spec, stats)


def test_empty_prompts_fail_as_without_speculation_and_the_engine_goes_on(runs):
    plain, respsp, _ = runs
    for i in range(3):
        assert "prompt cannot be empty" in plain["phases"][i]["error"]
        assert respsp["phases"][i]["error"] == plain["phases"][i]["error"]
    assert respsp["phases"][4] == plain["phases"][4]  # still serving, exactly


def test_structured_outputs_logprobs_and_seeds_equal_no_speculation(runs):
    plain, respsp, stats = runs
    mixed = respsp["phases"][3]
    assert mixed == plain["phases"][3]  # tokens, texts, logprobs
    tokens = [t[0] for t in mixed["token_ids"]]
    assert tokens[3] == [9, 10, 11, 2]  # the choice that follows the successor, then EOS
    assert tokens[4] == [5, 3, 7, 4, 2]  # forced off the successor path
    assert tokens[5] == [31 + i for i in range(8)]
    assert [tokens[0], tokens[8]] == [[11 + i for i in range(24)], [101 + i for i in range(16)]]
    assert len(mixed["logprobs"][6][0]) == 10 and all(len(step) >= 3 for step in mixed["logprobs"][6][0])
    # counted: the stats file and the Prometheus counter (read offline through LLM.get_metrics)
    fallbacks = stats["fallbacks"]
    assert fallbacks["chain_for_structured_outputs"] > 0 and "drafter_error" not in fallbacks
    for kind, count in fallbacks.items():
        assert respsp["metrics"][f'vllm:respsp_fallbacks{{"kind": "{kind}"}}'] == count
    # trees were used before and after the structured requests, and drafts accepted
    assert stats["shapes"].get("T8/D4/K2", 0) > 0
    for shape, count in stats["shapes"].items():  # the shape counter on /metrics says the same
        assert respsp["metrics"][f'vllm:respsp_tree_shapes{{"shape": "{shape}"}}'] == count
    assert sum(v for k, v in respsp["metrics"].items() if k.startswith("vllm:spec_decode_num_accepted_tokens{")) > 0


JSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
               "languages": {"type": "array", "items": {"type": "string"}}},
               "required": ["name", "age", "languages"]}


def test_json_outputs_on_the_testbed_model_equal_no_speculation():
    """JSON needs a real vocabulary: SmolLM2-135M with the shipped head, float32 (bf16 near-ties
    could flip an argmax when several tokens are verified at once), JSON schema, JSON object and
    choice constraints beside plain requests."""
    from vllm_respsp.draft import shipped_head_path
    from vllm_respsp.testbed.model import testbed_model_path

    def g(prompt, n, **extra):
        return {"prompt": prompt, "sampling": {"temperature": 0.0, "max_tokens": n, **extra}}

    phase = [g("List three fruits:", 48),
             g("Describe a person as JSON:", 60, structured_outputs={"json": JSON_SCHEMA}),
             g("Give the JSON for a city:", 40, structured_outputs={"json_object": True}),
             g("Is the sky blue? Answer:", 5, structured_outputs={"choice": ["yes", "no"]})]
    job = {"model": str(testbed_model_path()), "phases": [phase],
           "engine": {"dtype": "float32", "max_model_len": 512, "max_num_seqs": 3}}
    plain = run_requests(job)
    respsp = run_requests({**job, "speculative_config": {"method": "respsp", "model": str(shipped_head_path()),
                                                         "shape": TREE}})
    assert respsp["phases"] == plain["phases"]
    texts = [t[0] for t in respsp["phases"][0]["texts"]]
    assert texts[1].startswith("{") and isinstance(json.loads(texts[2]), dict) and texts[3] in ("yes", "no")
    assert respsp["metrics"]['vllm:respsp_fallbacks{"kind": "chain_for_structured_outputs"}'] > 0
