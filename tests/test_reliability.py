"""respsp under bad input and faults: every bad config fails at start-up with one clear message;
special requests and injected faults keep exact outputs and are counted, never fatal."""

import json
import shutil

import pytest
from conftest import run_engine

from vllm_respsp.config import RespspConfigError

TREE = {"total_tokens": 8, "depth": 4, "top_k": 2}


def engine_config(model, spec):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), speculative_config=spec, max_model_len=256,
                      enforce_eager=True).create_engine_config()


@pytest.fixture(scope="module")
def broken_heads(fixture_models, tmp_path_factory):
    """Copies of the successor head with one thing wrong each."""
    root = tmp_path_factory.mktemp("broken-heads")
    good = fixture_models["successor_head"]
    truncated = shutil.copytree(good, root / "truncated")
    weights = next(truncated.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    bad_json = shutil.copytree(good, root / "bad-json")
    (bad_json / "config.json").write_text("{not json")
    no_weights = shutil.copytree(good, root / "no-weights")
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    return {"truncated": truncated, "bad_json": bad_json, "no_weights": no_weights}


CASES = [
    # (change to a good config, message the error must contain)
    ({"num_speculative_tokens": 4}, r"unknown key\(s\) \['num_speculative_tokens'\]"),
    ({"shape": [8, 4, 2]}, "shape must be an object"),
    ({"shape": {"total_tokens": "8", "depth": 4, "top_k": 2}}, "shape.total_tokens must be a positive integer"),
    ({"shape": {"total_tokens": 8, "depth": 0, "top_k": 2}}, "shape.depth must be a positive integer"),
    ({"shape": {"total_tokens": 8, "depth": 4, "top_k": -1}}, "shape.top_k must be a positive integer"),
    ({"shape": {"total_tokens": 8, "depth": 4}}, "shape needs the keys"),
    ({"shape": {"total_tokens": 99, "depth": 3, "top_k": 2}}, "more than a depth-3, top-2 beam"),
    ({"actions": []}, "actions must hold at least one shape"),
    ({"actions": [TREE, TREE]}, "actions holds duplicate shapes"),
    ({"actions": {"total_tokens": 8}}, "actions must be a list"),
    ({"policy": "cycle"}, 'give "actions"'),
    ({"policy": 3}, "policy must be one of"),
    ({"policy": "/no/such/policy.json"}, "no such file"),
    ({"model": None}, "model is required"),
    ({"model": "/no/such/head"}, "expected a local EAGLE-3 head folder"),
]


@pytest.mark.parametrize("change,message", CASES)
def test_bad_configs_fail_at_start_up_naming_the_field(fixture_models, change, message):
    spec = {"method": "respsp", "model": str(fixture_models["successor_head"]), "shape": TREE, **change}
    with pytest.raises(RespspConfigError, match=message):
        engine_config(fixture_models["successor"], spec)


@pytest.mark.parametrize("which,message", [
    ("truncated", "is not a complete safetensors file"),
    ("bad_json", "config.json is not valid JSON"),
    ("no_weights", "no weights"),
    ("target_folder", "is not an EAGLE-3 head"),
    ("other_target_head", "was built for a target with hidden size"),
])
def test_bad_heads_fail_at_start_up(fixture_models, broken_heads, which, message):
    from vllm_respsp.draft import shipped_head_path

    head = {"target_folder": fixture_models["successor"],  # a target model, not a head
            "other_target_head": shipped_head_path(),  # SmolLM2's head (hidden 576, vocab 49152)
            }.get(which) or broken_heads.get(which)
    spec = {"method": "respsp", "model": str(head), "shape": TREE}
    with pytest.raises(RespspConfigError, match=message):
        engine_config(fixture_models["successor"], spec)


def successor_tokens(prompt, n):
    return [(prompt[-1] + 1 + i) % 128 for i in range(n)]


def test_special_requests_and_a_failing_drafter_keep_exact_outputs(fixture_models, tmp_path):
    """max_tokens 1, logprobs and penalties (vLLM's sampler via chains), seeds (trees, their own
    generator), n > 1, then every draft step failing: outputs stay exact and each fallback is
    counted."""
    prompts = [[5, 9, 30], [100, 7], [3]]
    samplings = [
        {"temperature": 0.0, "max_tokens": 1, "ignore_eos": True},
        {"temperature": 0.0, "max_tokens": 20, "ignore_eos": True, "logprobs": 2},
        {"temperature": 0.0, "max_tokens": 20, "ignore_eos": True, "presence_penalty": 0.1},
        {"temperature": 0.8, "max_tokens": 20, "ignore_eos": True, "seed": 11},
        {"temperature": 0.8, "max_tokens": 20, "ignore_eos": True, "n": 2},
        {"temperature": 0.0, "max_tokens": 20, "ignore_eos": True},
    ]
    spec = {"method": "respsp", "model": str(fixture_models["successor_head"]), "shape": TREE}
    base = {"model": str(fixture_models["successor"]), "prompts": prompts, "samplings": samplings,
            "engine": {"dtype": "float32", "max_model_len": 256}, "speculative_config": spec}
    stats = tmp_path / "stats.json"
    results = run_engine(base, env={"VLLM_RESPSP_STATS_FILE": str(stats)})["results"]
    for sampling, result in zip(samplings, results):
        assert result["token_ids"] == [successor_tokens(p, sampling["max_tokens"]) for p in prompts], sampling
    fallbacks = json.loads(stats.read_text())["fallbacks"]
    assert {"chain_for_logprobs", "chain_for_penalties"} <= set(fallbacks)
    assert "chain_for_seed" not in fallbacks  # a seeded request keeps its tree

    failing = run_engine(base, env={"VLLM_RESPSP_STATS_FILE": str(stats), "RESPSP_TEST_FAULT": "drafter_raises"})
    for sampling, result in zip(samplings, failing["results"]):
        assert result["token_ids"] == [successor_tokens(p, sampling["max_tokens"]) for p in prompts], sampling
        assert result["spec"]["accepted_tokens"] == 0
    assert json.loads(stats.read_text())["fallbacks"]["drafter_error"] > 0


def test_eos_inside_a_tree_and_preemption_under_kv_pressure(fixture_models, tmp_path):
    """EOS (token 2) reached in the middle of an accepted path stops the output exactly there;
    a KV cache too small for the batch forces preemption and recomputation of requests whose
    trees were in flight: outputs stay exact and the draft caches follow."""
    spec = {"method": "respsp", "model": str(fixture_models["successor_head"]), "shape": TREE}
    eos_prompts = [[120], [126, 127], [124]]
    crowded = [[10 * i + 3] for i in range(8)]
    job = {"model": str(fixture_models["successor"]), "speculative_config": spec,
           "engine": {"dtype": "float32", "max_model_len": 256, "num_gpu_blocks_override": 12,
                      "block_size": 32},
           "prompts": eos_prompts + crowded,
           "samplings": [{"temperature": 0.0, "max_tokens": 100}]}
    stats = tmp_path / "stats.json"
    result = run_engine(job, env={"VLLM_RESPSP_STATS_FILE": str(stats)})["results"][0]
    for prompt, tokens in zip(eos_prompts, result["token_ids"]):
        expected = successor_tokens(prompt, 100)
        assert tokens == expected[:expected.index(2) + 1], prompt  # up to and including EOS
    for prompt, tokens in zip(crowded, result["token_ids"][len(eos_prompts):]):
        expected = successor_tokens(prompt, 100)
        assert tokens == (expected[:expected.index(2) + 1] if 2 in expected else expected), prompt
    assert result["spec"]["acceptance_length"] > 3.5
    stats = json.loads(stats.read_text())
    assert stats["recomputed_requests"] > 0  # the cache really was too small: preemption happened
    assert "lost_draft_context" not in stats["fallbacks"]


def test_prompts_starting_in_the_prefix_cache_still_draft(fixture_models, tmp_path):
    """The second run of the same prompts finds their first blocks in vLLM's prefix cache, so a
    request's first step starts past position 0 with no draft context: the head drafts from the
    rest (respsp used to give such requests up as lost), outputs exact. The hit is as long as
    without speculation (every whole block before the last prompt token): vLLM's EAGLE drops its
    last block, respsp keeps it (patches.speculative_config)."""
    spec = {"method": "respsp", "model": str(fixture_models["successor_head"]), "shape": TREE}
    prompts = [[(5 + i) % 100 + 3 for i in range(70)], [(40 + i) % 100 + 3 for i in range(90)]]
    sampling = {"temperature": 0.0, "max_tokens": 20, "ignore_eos": True}
    job = {"model": str(fixture_models["successor"]), "speculative_config": spec, "prompts": prompts,
           "engine": {"dtype": "float32", "max_model_len": 256, "block_size": 32, "enable_prefix_caching": True},
           "samplings": [sampling, sampling]}
    stats = tmp_path / "stats.json"
    first, second = run_engine(job, env={"VLLM_RESPSP_STATS_FILE": str(stats)})["results"]
    for result in (first, second):
        assert result["token_ids"] == [successor_tokens(p, 20) for p in prompts]
        assert result["spec"]["acceptance_length"] > 3.0  # the second run drafted as well
    assert first["cached_tokens"] == [0, 0] and second["cached_tokens"] == [64, 64]
    stats = json.loads(stats.read_text())
    assert stats["prefix_cached_requests"] == 2 and not stats["fallbacks"]
    assert stats["head_kv"] == "paged"


def test_a_kv_layout_tree_attention_cannot_read_drafts_chains(fixture_models, tmp_path):
    """If the engine's CPU attention ISA stores the KV cache in a layout tree attention does not
    read (simulated here), trees are drafted as chains of their depth: exact, counted, alive."""
    spec = {"method": "respsp", "model": str(fixture_models["successor_head"]), "shape": TREE}
    prompts = [[5], [40, 41]]
    job = {"model": str(fixture_models["successor"]), "speculative_config": spec, "prompts": prompts,
           "engine": {"dtype": "float32", "max_model_len": 256},
           "samplings": [{"temperature": 0.0, "max_tokens": 20, "ignore_eos": True}]}
    stats = tmp_path / "stats.json"
    result = run_engine(job, env={"VLLM_RESPSP_STATS_FILE": str(stats),
                                  "RESPSP_TEST_FAULT": "no_tree_backend"})["results"][0]
    assert result["token_ids"] == [successor_tokens(p, 20) for p in prompts]
    assert result["spec"]["acceptance_length"] > 3.5  # the chains of depth 4 are accepted whole
    stats = json.loads(stats.read_text())
    assert set(stats["shapes"]) == {"T4/D4/K1"} and stats["fallbacks"]["chain_for_unsupported_attention_backend"] > 0


def test_prompts_at_the_length_limit(fixture_models):
    """A prompt that leaves 6 tokens of room: trees shrink to fit, the output is exact."""
    spec = {"method": "respsp", "model": str(fixture_models["successor_head"]), "shape": TREE}
    long_prompt = [(3 + i) % 128 for i in range(250)]
    job = {"model": str(fixture_models["successor"]), "speculative_config": spec,
           "engine": {"dtype": "float32", "max_model_len": 256},
           "prompts": [long_prompt, [7]],
           "samplings": [{"temperature": 0.0, "max_tokens": 6, "ignore_eos": True}]}
    result = run_engine(job)["results"][0]
    assert result["token_ids"] == [successor_tokens(long_prompt, 6), successor_tokens([7], 6)]
