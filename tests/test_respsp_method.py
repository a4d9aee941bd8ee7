"""`method: "respsp"` through real vLLM: accepted, validated at start-up, and lossless."""

import pytest
from conftest import run_engine

from vllm_respsp.config import RespspConfigError

CHAIN4 = {"total_tokens": 4, "depth": 4, "top_k": 1}


def engine_config(model, spec):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), speculative_config=spec, max_model_len=256,
                      enforce_eager=True).create_engine_config()


def test_respsp_chain_becomes_an_eagle3_config_carrying_the_settings(fixture_models):
    head = str(fixture_models["successor_head"])
    cfg = engine_config(fixture_models["successor"], {"method": "respsp", "model": head, "shape": CHAIN4})
    spec = cfg.speculative_config
    assert type(spec).__name__ == "RespspSpeculativeConfig"
    assert spec.method == "eagle3" and spec.num_speculative_tokens == 4
    tree = engine_config(fixture_models["successor"], {
        "method": "respsp", "model": head, "policy": "cycle",
        "actions": [CHAIN4, {"total_tokens": 24, "depth": 3, "top_k": 4}]}).speculative_config
    assert tree.num_speculative_tokens == 24  # the largest tree any step may verify
    assert spec.respsp["shape"] == CHAIN4 and spec.respsp["model"] == head
    other = engine_config(fixture_models["successor"], {"method": "respsp", "model": head,
                                                        "shape": {"total_tokens": 3, "depth": 3, "top_k": 1}})
    assert other.speculative_config.compute_hash() != spec.compute_hash()


@pytest.mark.parametrize("change,message", [
    ({"shape": {"total_tokens": 99, "depth": 3, "top_k": 2}}, "more than a depth-3, top-2 beam"),
    ({"num_speculative_tokens": 3}, r"unknown key\(s\) \['num_speculative_tokens'\]"),
    ({"policy": "cycle"}, 'give "actions"'),
    ({"policy": "nearest"}, "no such file"),
    ({"policy": __file__}, "policy: policy file .* not valid JSON"),  # a file, but no policy
])
def test_bad_respsp_configs_fail_at_start_up(fixture_models, change, message):
    spec = {"method": "respsp", "model": str(fixture_models["successor_head"]), "shape": CHAIN4, **change}
    with pytest.raises(RespspConfigError, match=message):
        engine_config(fixture_models["successor"], spec)


# whole chains take the runtime's chain path (`TreeDrafter.draft_chains`); chain 1 runs no head pass in it
@pytest.mark.parametrize("shape", [CHAIN4, {"total_tokens": 1, "depth": 1, "top_k": 1}], ids=["chain4", "chain1"])
def test_respsp_chain_is_lossless_on_the_successor_pair(fixture_models, shape):
    job = {"model": str(fixture_models["successor"]), "prompts": [[5, 9, 30], [100, 7]],
           "samplings": [{"temperature": 0.0, "max_tokens": 40, "ignore_eos": True},
                         {"temperature": 0.8, "max_tokens": 40, "ignore_eos": True, "seed": 7}],
           "engine": {"dtype": "float32", "max_model_len": 256},
           "speculative_config": {"method": "respsp", "model": str(fixture_models["successor_head"]),
                                  "shape": shape}}
    results = run_engine(job)["results"]
    for r in results:
        assert r["token_ids"] == [[31 + i for i in range(40)], [(8 + i) % 128 for i in range(40)]]
        assert r["spec"]["accepted_tokens"] >= 0.95 * r["spec"]["draft_tokens"] > 0
