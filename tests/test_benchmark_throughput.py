"""The throughput benchmark's own logic, end to end on the tiny fixtures (two small engines)."""

import json
from types import SimpleNamespace

import pytest

from benchmarks import throughput
from vllm_respsp.testbed import engines


def test_summaries_and_speedups():
    samples = [{"seconds": 2.0, "output_tokens": 100, "spec": {"drafts": 10, "draft_tokens": 30,
                                                               "accepted_tokens": 15, "accepted_per_pos": [8, 5, 2]}},
               {"seconds": 1.0, "output_tokens": 100, "spec": {"drafts": 10, "draft_tokens": 30,
                                                               "accepted_tokens": 15, "accepted_per_pos": [8, 5, 2]}},
               {"seconds": 4.0, "output_tokens": 100, "spec": {"drafts": 0, "draft_tokens": 0,
                                                               "accepted_tokens": 0, "accepted_per_pos": []}}]
    s = throughput.summarize(samples, batch_size=4)
    assert s["tokens_per_s"] == 50.0 and (s["tokens_per_s_min"], s["tokens_per_s_max"]) == (25.0, 100.0)
    assert s["ms_per_output_token"] == pytest.approx(80.0)
    assert s["acceptance_length"] == pytest.approx(2.5)
    assert s["acceptance_per_pos"] == pytest.approx([0.8, 0.5, 0.2])
    cell = {"none": {"tokens_per_s": 10.0}, "eagle3-2": {"tokens_per_s": 15.0}, "eagle3-4": {"tokens_per_s": 20.0}}
    throughput.add_speedups(cell)
    del cell["eagle3-4"]
    assert cell["eagle3-2"]["speedup_vs_none"] == 1.5 and cell["eagle3-2"]["speedup_vs_best_eagle3"] == 0.75
    assert throughput.batches(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    runs = {"none": [{"token_ids": [[1, 2], [3]]}] * 2,
            "eagle3-2": [{"token_ids": [[1, 2], [3]]}, {"token_ids": [[1, 2], [4]]}]}  # rep 2 differs
    throughput.add_identity(cell, runs)
    assert cell["none"]["identical_to_none"] == "2/2" and cell["eagle3-2"]["identical_to_none"] == "1/2"


def test_run_on_fixtures_writes_json_table_and_plots(fixture_models, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"text": t, "kind": "completion"})
                                 for t in ["w5 w6 w7", "w9 w3", "w40 w41 w42"]))
    out = throughput.main(["--model", str(fixture_models["tiny"]), "--head", str(fixture_models["tiny_head"]),
                           "--prompt-sets", str(prompts), "--batch-sizes", "1", "3", "--num-prompts", "3",
                           "--batching", "static", "continuous",
                           "--max-tokens", "6", "--chains", "2", "--respsp", "T4/D2/K2", "--reps", "2",
                           "--max-model-len", "256",
                           "--dtype", "float32", "--out", str(tmp_path / "run")])
    result = json.loads((out / "throughput.json").read_text())
    assert [c["name"] for c in result["configs"]] == ["none", "eagle3-2", "respsp-T4/D2/K2", "eagle3-k-by-batch"]
    # vLLM's K-by-batch-size schedule, tuned from this run's K=0 and K=2 columns at batch 1 and 3
    tuning = result["k_by_batch_tuning"]
    assert set(tuning["best_k"]) == {"1", "3"} and set(tuning["best_k"].values()) <= {0, 2}
    schedule = result["configs"][3]["speculative_config"]["num_speculative_tokens_per_batch_size"]
    assert [row[:2] for row in schedule] == [[1, 2], [3, 12]]
    assert [(c["batching"], c["batch_size"], c["num_prompts"]) for c in result["cells"]] == [
        ("static", 1, 3), ("static", 3, 3), ("continuous", 1, 3), ("continuous", 3, 3)]
    for cell in result["cells"]:
        assert cell["configs"]["none"]["speedup_vs_none"] == 1.0
        assert cell["configs"]["eagle3-2"]["acceptance_length"] >= 1.0
        assert cell["configs"]["respsp-T4/D2/K2"]["acceptance_length"] >= 1.0
        assert cell["configs"]["respsp-T4/D2/K2"]["speedup_vs_best_eagle3"] > 0
        assert {c["identical_to_none"] for c in cell["configs"].values()} == {"3/3"}  # float32: exact
        assert {c["lossless"]["label"] for c in cell["configs"].values()} == {"identical"}
        assert cell["configs"]["respsp-T4/D2/K2"]["respsp_fallbacks"] == {}
    for key in (f"{prompts}/bs1", f"{prompts}/bs1/continuous"):  # one request in flight: the same tokens
        raw = result["raw"][key]
        assert [s["rep"] for s in raw["none"]] == [0, 1] and all(s["output_tokens"] == 18 for s in raw["none"])
        assert raw["eagle3-2"][0]["token_ids"] == result["raw"][f"{prompts}/bs1"]["none"][0]["token_ids"]
    table = (out / "throughput.md").read_text()
    assert "EAGLE-3 chain of 2" in table and "respsp T4/D2/K2" in table
    assert table.count("\n| ") == 17  # header + 4 cells x 4 configs
    assert "| 3 continuous | EAGLE-3 chain of 2 |" in table
    assert "EAGLE-3, K by batch size" in table
    assert (out / "speedup_vs_batch.png").stat().st_size > 1000
    assert (out / "acceptance_hist.png").stat().st_size > 1000


def test_a_real_mismatch_fails_the_run_and_near_ties_are_told_apart(fixture_models, tmp_path, monkeypatch):
    """bf16, the successor pair, and a tree sampler broken on purpose (its bonus token is off by
    one): the respsp column is a MISMATCH (the target's logits there are 40 apart, no near tie),
    the EAGLE-3 column is identical, and the run fails after writing its results."""
    from conftest import BASE_ENV

    monkeypatch.setenv("PYTHONPATH", BASE_ENV["PYTHONPATH"])  # the engines load the test hooks
    monkeypatch.setenv("RESPSP_TEST_FAULT", "wrong_bonus")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"text": t, "kind": "completion"}) for t in ["w5 w6", "w40"]))
    with pytest.raises(SystemExit, match="MISMATCH: .*respsp-T4/D2/K2"):
        throughput.main(["--model", str(fixture_models["successor"]), "--head", str(fixture_models["successor_head"]),
                         "--prompt-sets", str(prompts), "--batch-sizes", "2", "--num-prompts", "2",
                         "--max-tokens", "8", "--chains", "2", "--respsp", "T4/D2/K2", "--reps", "1",
                         "--max-model-len", "128", "--dtype", "bfloat16", "--k-by-batch", "none",
                         "--out", str(tmp_path / "run")])
    cell = json.loads((tmp_path / "run" / "throughput.json").read_text())["cells"][0]["configs"]
    assert cell["eagle3-2"]["lossless"]["label"] == "identical"
    verdict = cell["respsp-T4/D2/K2"]["lossless"]
    assert verdict["label"] == "MISMATCH (2 of 2 prompts)"
    # the wrong token is not even among the target's top logits there (gap unknown: a mismatch)
    assert all(not d["near_tie"] and (d["gap"] is None or d["gap"] > 30) for d in verdict["divergences"])


class RecordingWorker:
    """Stands in for an engine worker: records what run_cell asks of it."""

    def __init__(self, name):
        self.config = type("Config", (), {"name": name})()
        self.calls = []

    def generate(self, prompts, sampling, fresh_prefix_cache=False, max_in_flight=None):
        self.calls.append((len(prompts), sampling["max_tokens"], fresh_prefix_cache, max_in_flight))
        n = len(prompts)
        return {"seconds": 1.0, "output_tokens": n, "token_ids": [[1]] * n, "prompt_token_ids": [[2]] * n,
                "cached_tokens": [0] * n, "spec": {"accepted_per_pos": []}}


def test_every_engine_warms_up_and_every_repetition_starts_from_an_empty_prefix_cache():
    workers = [RecordingWorker("none"), RecordingWorker("respsp")]
    samples = throughput.run_cell(workers, ["a", "b", "c"], 2, {"max_tokens": 50}, 2, throughput._Quiet())
    for w in workers:
        warm_up, *timed = w.calls
        assert warm_up == (2, engines.WARM_UP_TOKENS, False, None)
        # per repetition: batches of 2 and 1, the first from an empty prefix cache
        assert timed == [(2, 50, True, None), (1, 50, False, None)] * 2
        assert [s["output_tokens"] for s in samples[w.config.name]] == [3, 3]
    throughput.run_cell(workers[:1], ["a", "b", "c"], 2, {"max_tokens": 50}, 1, throughput._Quiet(), "continuous")
    assert workers[0].calls[-1] == (3, 50, True, 2)  # all queued, 2 in flight
    with pytest.raises(ValueError, match="batching='dynamic': allowed values are \\['static', 'continuous'\\]"):
        engines.generate_in_batches(workers[0], ["a"], 1, {}, "dynamic")


class CountingEngine:
    """vLLM's LLMEngine as generate_in_flight uses it: request i finishes after `steps[i]`
    steps; add_request returns vLLM's internal id (the caller's with a suffix), outputs carry
    the caller's."""

    class Output:
        def __init__(self, request_id, finished):
            self.request_id, self.finished = request_id, finished

    def __init__(self, steps):
        self.steps, self.running, self.most_running = steps, {}, 0

    def add_request(self, request_id, prompt, params):
        self.running[request_id] = self.steps[int(request_id)]
        return f"{request_id}-x"

    def has_unfinished_requests(self):
        return bool(self.running)

    def get_num_unfinished_requests(self):
        return len(self.running)

    def step(self):
        self.most_running = max(self.most_running, len(self.running))
        for rid in self.running:
            self.running[rid] -= 1
        done = [rid for rid, left in self.running.items() if left == 0]
        for rid in done:
            del self.running[rid]
        return [self.Output(rid, True) for rid in done] + [self.Output(rid, False) for rid in self.running]


def test_continuous_batching_keeps_the_cap_and_the_input_order():
    from vllm_respsp.testbed.engine_run import generate_in_flight

    engine = CountingEngine([5, 1, 1, 3, 2])
    outputs = generate_in_flight(engine, ["p0", "p1", "p2", "p3", "p4"], None, max_in_flight=2)
    assert [o.request_id for o in outputs] == ["0", "1", "2", "3", "4"]
    assert engine.most_running == 2 and not engine.running


def test_k_by_batch_schedules():
    assert throughput.parse_k_schedule("1-2:3,3-1024:0") == [[1, 2, 3], [3, 1024, 0]]
    assert throughput.parse_k_schedule("1:2,2-8:0") == [[1, 1, 2], [2, 8, 0]]
    for bad in ("1-2", "0-4:2", "4-2:1", "1-2:-1", "a-2:1"):
        with pytest.raises(ValueError, match=f"part '{bad}' is not START-END:K"):
            throughput.parse_k_schedule(bad)
    assert throughput.schedule_from_best({1: 3, 4: 2, 16: 0}, 64) == [[1, 3, 3], [4, 15, 2], [16, 64, 0]]
    config = throughput.k_by_batch_config("h", [[1, 64, 0]], {})
    assert config.speculative_config["num_speculative_tokens"] == 1  # vLLM needs K > 0 to load the head
    assert config.describe() == "EAGLE-3, K by batch size"


def test_near_tie_verdicts():
    from vllm_respsp.testbed.lossless import BF16_STEPS, Verdict, bf16_step, judge

    assert bf16_step(20.0) == 0.125 and bf16_step(1.0) == 2 ** -7
    reference, candidate, prompts = [[1, 2, 3], [4, 5]], [[1, 2, 7], [4, 5]], [[0], [0]]

    def logits(gap):
        return lambda contexts: [{3: 20.0, 7: 20.0 - gap, 9: 10.0} for _ in contexts]

    near = judge(reference, candidate, prompts, "bfloat16", logits(BF16_STEPS * 0.125))
    assert near.ok and near.label() == "equal up to 1 near-tie" and near.divergences[0].position == 2
    # the speculative token may be the one ahead where the check reads the logits (its batch
    # differs from the decode's): the gap counts, not its sign
    assert judge(reference, candidate, prompts, "bfloat16", logits(-0.25)).ok
    far = judge(reference, candidate, prompts, "bfloat16", logits((BF16_STEPS + 1) * 0.125))
    assert not far.ok and far.label() == "MISMATCH (1 of 2 prompts)"
    saved = far.to_dict()  # a stored verdict is judged again with today's tolerance, gaps kept
    saved["tolerance_bf16_steps"] = BF16_STEPS * 2
    saved["divergences"][0]["tolerance"] *= 2
    assert Verdict.from_dict(far.to_dict()).label() == far.label()
    assert Verdict.from_dict(saved).label() == far.label()  # rescaled to BF16_STEPS, still too far
    saved["divergences"][0]["gap"] = BF16_STEPS * 0.125
    assert Verdict.from_dict(saved).ok
    exact = judge(reference, candidate, prompts, "float32", logits(0.0))  # float32: no tolerance
    assert exact.label() == "MISMATCH (1 of 2 prompts)"
    assert judge(reference, reference, prompts, "bfloat16", None).label() == "identical"


def test_a_policy_column_per_schedule():
    configs = throughput.engine_configs("h", [], {}, [], ["pol/bandit.json"], "chain3", ["policy", "measured"])
    assert [c.name for c in configs] == ["none", "respsp-policy-bandit", "respsp-policy-bandit-measured"]
    assert "schedule" not in configs[1].speculative_config and configs[2].speculative_config["schedule"] == "measured"
    assert [c.describe() for c in configs[1:]] == ["respsp policy pol/bandit",
                                                   "respsp policy pol/bandit (measured schedule)"]


def test_policies_of_one_file_name_get_a_column_each():
    # Both shipped policies are bandit.json: named by the stem alone, the second column took the
    # first's name and replaced its figures (throughput-20261206n's first run).
    configs = throughput.engine_configs("h", [], {}, [], ["a/amx/bandit.json", "a/avx512/bandit.json", "b/ppo.json"])
    assert [c.name for c in configs] == ["none", "respsp-policy-amx-bandit", "respsp-policy-avx512-bandit",
                                         "respsp-policy-ppo"]
    with pytest.raises(ValueError, match="share a name"):
        throughput.engine_configs("h", [2, 2], {}, [], [])


class ReplayWorker:
    """Stands in for an EngineWorker: a configuration name and a fixed time per generate."""

    def __init__(self, name, seconds):
        self.config = SimpleNamespace(name=name)
        self.seconds = seconds

    def generate(self, prompts, sampling, fresh_prefix_cache=False, max_in_flight=None):
        return {"seconds": self.seconds, "output_tokens": 10 * len(prompts), "token_ids": [[1]] * len(prompts),
                "prompt_token_ids": [[0]] * len(prompts), "cached_tokens": [0] * len(prompts),
                "spec": {"accepted_per_pos": []}}


def test_engines_of_one_configuration_pool_their_samples_and_say_which_engine():
    workers = [ReplayWorker("none", 1.0), ReplayWorker("none", 2.0), ReplayWorker("eagle3-1", 1.0)]
    samples = throughput.run_cell(workers, ["a", "b"], 2, {}, 2, SimpleNamespace(update=lambda n: None))
    assert sorted((s["rep"], s["engine"], s["seconds"]) for s in samples["none"]) == [
        (0, 0, 1.0), (0, 1, 2.0), (1, 0, 1.0), (1, 1, 2.0)]
    assert [s["engine"] for s in samples["eagle3-1"]] == [0, 0]
    assert throughput.summarize(samples["none"], 2)["tokens_per_s"] == 15.0  # median of 20, 20, 10, 10
