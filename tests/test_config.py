"""The respsp speculative config: defaults, and one clear error per kind of bad input."""

import json

import pytest

from vllm_respsp import config as C
from vllm_respsp.tree.shape import TreeShape


@pytest.fixture(scope="module")
def head(fixture_models):
    return str(fixture_models["tiny_head"])


def test_defaults_and_round_trip(head):
    cfg = C.parse({"method": "respsp", "model": head})
    assert cfg.shape == C.DEFAULT_SHAPE and cfg.policy == "static" and cfg.actions == ()
    full = C.parse({"method": "respsp", "model": head, "shape": {"total_tokens": 8, "depth": 3, "top_k": 2},
                    "actions": [{"total_tokens": 4, "depth": 4, "top_k": 1},
                                {"total_tokens": 32, "depth": 6, "top_k": 4}]})
    assert full.shape == TreeShape(8, 3, 2)
    assert full.max_depth == 6 and full.max_total_tokens == 32
    assert C.parse(full.to_dict()) == full


BAD = [
    ({"extra": 1}, r"unknown key\(s\) \['extra'\].*allowed"),
    ({"model": None}, "model is required"),
    ({"model": "/no/such/head"}, r"model='/no/such/head': expected a local EAGLE-3 head folder"),
    ({"shape": {"total_tokens": 0, "depth": 1, "top_k": 1}}, "shape.total_tokens must be a positive integer"),
    ({"shape": {"total_tokens": 8, "depth": -2, "top_k": 1}}, "shape.depth must be a positive integer"),
    ({"shape": {"total_tokens": 8, "depth": 2, "top_k": "4"}}, "shape.top_k must be a positive integer"),
    ({"shape": {"total_tokens": 30, "depth": 2, "top_k": 4}},
     r"more than a depth-2, top-4 beam can produce; allowed: 1..20"),
    ({"shape": {"total_tokens": 3, "depth": 5, "top_k": 2}}, "cannot fill depth=5"),
    ({"shape": {"total_tokens": 3, "depth": 2}}, r"shape needs the keys.*missing: \['top_k'\]"),
    ({"shape": {"total_tokens": 8, "depth": 8, "top_k": 1, "min_prob": 1.5}},
     r"shape.min_prob must be a number in \[0, 1\)"),
    ({"actions": [{"total_tokens": 8, "depth": 8, "top_k": 1, "min_prob": "high"}]}, r"actions\[0\].min_prob must be"),
    ({"shape": [3, 2, 2]}, "shape must be an object"),
    ({"actions": []}, "actions must hold at least one shape"),
    ({"actions": [{"total_tokens": 0, "depth": 0, "top_k": 0}]}, "at least one shape that drafts"),
    ({"shape": {"total_tokens": 0, "depth": 0, "top_k": 0}}, r"shape=T0/D0/K0 drafts nothing.*only among actions"),
    ({"actions": {"total_tokens": 3}}, "actions must be a list of shapes"),
    ({"actions": [{"total_tokens": 4, "depth": 4, "top_k": 1}] * 2}, "duplicate"),
    ({"actions": [{"total_tokens": 99, "depth": 2, "top_k": 2}]}, r"actions\[0\].total_tokens=99 is more than"),
    ({"policy": "/no/such/policy.safetensors"}, "no such file"),
    ({"policy": 3}, "policy must be"),
    ({"schedule": "fastest"}, r"schedule must be one of \['policy', 'measured'\], got 'fastest'"),
    ({"schedule": "policy"}, "schedule applies to a policy file; policy='static' has none"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_configs_name_the_field(head, change, message):
    with pytest.raises(C.RespspConfigError, match=message):
        C.parse({"method": "respsp", "model": head, **change})


def test_token_budget_and_non_eagle3_heads(head, fixture_models, tmp_path):
    with pytest.raises(C.RespspConfigError, match="exceeds the engine's per-request token budget"):
        C.parse({"method": "respsp", "model": head, "shape": {"total_tokens": 40, "depth": 4, "top_k": 8}},
                max_tokens_per_request=32)
    with pytest.raises(C.RespspConfigError, match="is not an EAGLE-3 head"):
        C.parse({"method": "respsp", "model": str(fixture_models["tiny"])})
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLMEagle3"]}))
    with pytest.raises(C.RespspConfigError, match="no weights"):
        C.parse({"method": "respsp", "model": str(tmp_path)})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(C.RespspConfigError, match="not valid JSON"):
        C.parse({"method": "respsp", "model": str(tmp_path)})


def test_no_drafts_is_an_action_and_parses_both_ways(head):
    from vllm_respsp.tree.shape import NO_DRAFTS

    assert TreeShape.parse("none") == TreeShape.parse(str(NO_DRAFTS)) == NO_DRAFTS
    cfg = C.parse({"method": "respsp", "model": head, "policy": "cycle",
                   "actions": [NO_DRAFTS.to_dict(), {"total_tokens": 3, "depth": 3, "top_k": 1}]})
    assert NO_DRAFTS in cfg.actions and cfg.max_depth == cfg.shape.depth


def test_confidence_bounded_shapes_parse_and_round_trip(head):
    bounded = TreeShape(8, 8, 1, 0.3)
    assert TreeShape.parse("T8/D8/K1/p0.3") == TreeShape.parse("chain8/p0.3") == bounded
    assert str(bounded) == "T8/D8/K1/p0.3" and TreeShape.from_dict(bounded.to_dict()) == bounded
    assert "min_prob" not in TreeShape(8, 8, 1).to_dict()  # static shapes keep their old form
    cfg = C.parse({"method": "respsp", "model": head, "shape": bounded.to_dict(), "policy": "cycle",
                   "actions": [bounded.to_dict(), {"total_tokens": 12, "depth": 6, "top_k": 2, "min_prob": 0.1}]})
    assert cfg.shape == bounded and C.parse(cfg.to_dict()) == cfg
    with pytest.raises(Exception, match="expected chainN"):
        TreeShape.parse("T8/D8/K1/q0.3")
    verified = TreeShape(8, 8, 1, 0.3, 0.1)
    assert TreeShape.parse("chain8/p0.3/v0.1") == verified and str(verified) == "T8/D8/K1/p0.3/v0.1"
    assert TreeShape.parse("chain1/v0.4") == TreeShape(1, 1, 1, 0.0, 0.4)
    assert TreeShape.from_dict(verified.to_dict()) == verified
    with pytest.raises(Exception, match=r"shape.verify_min_prob must be a number in \[0, 1\)"):
        TreeShape(1, 1, 1, 0.0, 1.0).validate()
