"""Training on tiny synthetic traces: bandit learns the table, PPO exports exactly, runs repeat."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from vllm_respsp.policy.cost import load_cost_model
from vllm_respsp.policy.policy_file import load_policy
from vllm_respsp.policy.shape_policy import ShapePolicy
from vllm_respsp.policy.simulator import best_static, drafts_at, simulate
from vllm_respsp.policy.traces import save_traces, synthetic_traces
from vllm_respsp.policy.train import main, make_net, train_bandit, train_ppo
from vllm_respsp.tree.shape import NO_DRAFTS, TreeShape, chain

ACTIONS = [chain(1), chain(2), chain(4), TreeShape(8, 3, 4), TreeShape(16, 5, 4), TreeShape(32, 6, 8)]


def small_traces(seed=0, generations=4, positions=60):
    return synthetic_traces(ACTIONS, num_generations=generations, positions=positions,
                            hidden_size=4, seed=seed)


def test_bandit_beats_a_bad_static_choice_and_tracks_the_best():
    torch.set_num_threads(1)
    traces, cost = small_traces(generations=8, positions=100), load_cost_model("cpu-smollm2-135m")
    rates = {b: best_static(traces, cost, b)[1] for b in (1, 64)}
    net = make_net(traces, 8, (32,), "tanh", seed=0)
    info = train_bandit(net, traces, cost, (1, 64), rates, epochs=15, seed=0)
    assert info["rows"] == 2 * 8 * 100
    for batch in (1, 64):
        got = simulate(traces, cost, net.act, batch).tokens_per_s
        static = [simulate(traces, cost, a, batch).tokens_per_s for a in range(len(ACTIONS))]
        assert got > np.mean(static)  # it learned which shapes pay off at this load
        assert got > 0.9 * rates[batch]  # near or above the best static shape (its train data)


def test_ppo_export_matches_sb3_actor():
    torch.set_num_threads(1)
    traces, cost = small_traces(), load_cost_model("cpu-smollm2-135m")
    rates = {b: best_static(traces, cost, b)[1] for b in (1, 8)}
    net = make_net(traces, 8, (16, 16), "tanh", seed=0)
    info, model = train_ppo(net, traces, cost, (1, 8), hold=2, rates=rates, steps=256, seed=0,
                            n_envs=2)
    assert info["timesteps"] == 256 and info["hold"] == 2
    # the exported net gives SB3's deterministic action on every observation
    feats = np.concatenate([g.features for g in traces.generations])
    extras = np.random.default_rng(0).random((len(feats), 2)).astype(np.float32)
    obs = np.concatenate([feats, extras], axis=1)
    sb3_actions, _ = model.predict(obs, deterministic=True)
    ours = net(torch.as_tensor(obs)).argmax(-1).numpy()
    np.testing.assert_array_equal(ours, sb3_actions)


def test_cli_writes_loadable_reproducible_policies(tmp_path):
    save_traces(small_traces(), tmp_path / "traces")
    args = ["--traces", str(tmp_path / "traces.json"), "--profile", "cpu-smollm2-135m",
            "--batch-loads", "1", "64", "--bandit-epochs", "2", "--ppo-steps", "128",
            "--hold", "2", "--seed", "3"]
    report = main(args + ["--out", str(tmp_path / "a")])
    main(args + ["--out", str(tmp_path / "b")])
    for algo in ("bandit", "ppo"):
        a = (tmp_path / "a" / f"{algo}.safetensors").read_bytes()
        assert a == (tmp_path / "b" / f"{algo}.safetensors").read_bytes()  # same seed, same weights
        pf = load_policy(tmp_path / "a" / f"{algo}.json", hidden_size=4)
        assert pf.actions == ACTIONS + [NO_DRAFTS]  # --no-drafts on (the default) adds it
        assert pf.meta["cost_profile"]["name"] == "cpu-smollm2-135m"
    assert load_policy(tmp_path / "a" / "ppo.json").hold == 2
    row = report["tokens_per_s_on_eval"]["eval"]["64"]
    assert row["oracle"] >= max(row["bandit"], row["ppo"], row["best_static"]) * 0.999
    assert json.loads((tmp_path / "a" / "report.json").read_text())["files"]["bandit"]
    policy = ShapePolicy.from_file(tmp_path / "a" / "bandit.json")
    shapes = policy.choose([0, 1], torch.randn(2, 12), torch.zeros(2), 64)
    assert all(s in ACTIONS + [NO_DRAFTS] for s in shapes) and policy.fallback_count == 0
    gate = load_policy(tmp_path / "a" / "bandit.json").max_draft_load  # the load gate, tuned and served
    for load, row in report["tokens_per_s_on_eval"]["eval"].items():
        assert row["bandit_drafts"] == drafts_at(int(load), gate)
        if not row["bandit_drafts"]:
            assert row["bandit"] == pytest.approx(row["no_speculation"])
    main(args + ["--out", str(tmp_path / "c"), "--algo", "bandit", "--no-drafts", "off"])
    assert load_policy(tmp_path / "c" / "bandit.json").actions == ACTIONS


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "vllm_respsp.policy.train", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--traces" in out.stdout and "--profile" in out.stdout


def test_held_out_trace_sets_and_feature_ablation(tmp_path):
    save_traces(small_traces(seed=0), tmp_path / "train")
    save_traces(small_traces(seed=1), tmp_path / "heldout")
    first = small_traces().feature_spec[0]
    report = main(["--traces", str(tmp_path / "train.json"), "--eval-traces", str(tmp_path / "heldout.json"),
                   "--features", first.name, "--algo", "bandit", "--batch-loads", "1",
                   "--bandit-epochs", "1", "--out", str(tmp_path / "p")])
    assert set(report["tokens_per_s_on_eval"]) == {"heldout"} and report["features"] == [first.name]
    assert load_policy(tmp_path / "p" / "bandit.json").net.architecture["feature_dim"] == first.dim
    with pytest.raises(SystemExit, match="not in the traces"):
        main(["--traces", str(tmp_path / "train.json"), "--features", "nope", "--out", str(tmp_path / "q")])


def test_action_subset_trains_and_evaluates_on_those_actions_only(tmp_path):
    save_traces(small_traces(), tmp_path / "traces")
    args = ["--traces", str(tmp_path / "traces.json"), "--algo", "bandit", "--batch-loads", "1", "8",
            "--bandit-epochs", "1"]
    report = main(args + ["--actions", "chain1", "chain4", "--out", str(tmp_path / "p")])
    assert load_policy(tmp_path / "p" / "bandit.json").actions == [chain(1), chain(4), NO_DRAFTS]
    for row in report["tokens_per_s_on_eval"]["eval"].values():
        assert row["best_static_action"] in ("T1/D1/K1", "T4/D4/K1", "T0/D0/K0")
    with pytest.raises(SystemExit, match="not in these traces' actions .* and no pools"):
        main(args + ["--actions", "chain3", "--out", str(tmp_path / "q")])
    with pytest.raises(SystemExit):
        main(args + ["--actions", "chain", "--out", str(tmp_path / "r")])


def test_second_bandit_round_prices_seconds_at_the_policys_own_rate(tmp_path):
    save_traces(small_traces(), tmp_path / "traces")
    report = main(["--traces", str(tmp_path / "traces.json"), "--algo", "bandit", "--batch-loads", "1", "64",
                   "--bandit-epochs", "2", "--bandit-rounds", "2", "--out", str(tmp_path / "p")])
    meta = load_policy(tmp_path / "p" / "bandit.json").meta["training"]
    for batch in ("1", "64"):  # never below the best static rate, which the first round used
        assert meta["reward_rates"][batch] >= meta["reference_rates"][batch]
    assert report["tokens_per_s_on_eval"]["eval"]["1"]["bandit"] > 0
