"""The serving benchmark's own logic: summaries and report on made-up samples, then one tiny
end-to-end run on the successor fixture (two servers, started and stopped by the benchmark)."""

import argparse
import json
import socket

import pytest

from benchmarks import serving


def sample(duration, output_lens, ttfts, latencies, drafts=0, accepted=0, per_pos=()):
    return {"duration_s": duration, "completed": len(output_lens), "failed": 0, "input_lens": [5] * len(output_lens),
            "output_lens": output_lens, "ttfts": ttfts, "latencies": latencies,
            "itls": [[(l - t) / max(1, n - 1)] * max(0, n - 1) for n, t, l in zip(output_lens, ttfts, latencies)],
            "errors": [], "spec": {"drafts": drafts, "draft_tokens": 2 * drafts, "accepted_tokens": accepted,
                                   "accepted_per_pos": list(per_pos)}}


def test_loads_summaries_speedups_and_report(tmp_path):
    loads = serving.make_loads([1, 8], [0.5])
    assert [l["name"] for l in loads] == ["c1", "c8", "0.5/s"]
    assert [serving.requests_per_load(l, 4) for l in loads] == [4, 16, 4]

    samples = [sample(2.0, [10, 10], [0.1, 0.3], [1.0, 1.2], drafts=10, accepted=6, per_pos=[5, 1]),
               sample(1.0, [10, 0], [0.2, 0.0], [1.1, 0.0], drafts=5, accepted=3, per_pos=[2, 1])]
    samples[1]["failed"], samples[1]["completed"] = 1, 1
    s = serving.summarize(samples)
    assert (s["output_tokens_per_s"], s["output_tokens_per_s_min"], s["output_tokens_per_s_max"]) == (10.0, 10.0, 10.0)
    assert s["requests_per_s"] == 1.0 and (s["completed"], s["failed"]) == (3, 1)
    assert s["ttft_ms"]["p50"] == pytest.approx(200.0)  # the failed request's zeros are left out
    assert s["tpot_ms"]["p50"] == pytest.approx(100.0)  # (latency - ttft) / 9 = 0.1 s for all three
    assert s["itl_ms"]["p99"] == pytest.approx(100.0)
    assert s["acceptance_length"] == pytest.approx(1.6) and s["acceptance_per_pos"] == pytest.approx([7 / 15, 2 / 15])

    cell = {"none": {"output_tokens_per_s": 10.0}, "eagle3-3": {"output_tokens_per_s": 20.0},
            "respsp-T4/D2/K2": {"output_tokens_per_s": 25.0}}
    serving.add_speedups(cell)
    assert cell["respsp-T4/D2/K2"]["speedup_vs_none"] == 2.5
    assert cell["respsp-T4/D2/K2"]["speedup_vs_best_eagle3"] == 1.25

    configs = [{"name": "none", "describe": "no speculation", "speculative_config": None},
               {"name": "eagle3-3", "describe": "EAGLE-3 chain of 3", "speculative_config": {"method": "eagle3"}}]
    summary = serving.summarize(samples)
    cells = [{"prompt_set": "mt-bench", "load": l, "configs": {"none": dict(summary), "eagle3-3": dict(summary)}}
             for l in ("c1", "c8")]
    for c in cells:
        serving.add_speedups(c["configs"])
    result = {"command": "python -m benchmarks.serving --quick", "date": "x", "complete": True, "model": "/m/SmolLM2",
              "head": "/h", "machine": {"device": "cpu", "cpus": 2, "vllm": "0.32.0", "torch": "2.13.0+cpu"},
              "settings": {"max_tokens": 8, "temperature": 0.0}, "configs": configs, "cells": cells}
    serving.write_report(result, tmp_path)
    table = (tmp_path / "serving.md").read_text()
    assert table.count("\n| mt-bench |") == 4 and "| c8 | EAGLE-3 chain of 3 (1 failed) |" in table
    assert "| 200/" in table  # TTFT p50 in ms
    for png in ("serving_throughput.png", "serving_latency.png", "serving_acceptance.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_k_by_batch_schedule_is_a_served_configuration(capsys):
    args = argparse.Namespace(chains=[3], respsp=[], policies=[], policy_shape="chain3", k_by_batch="1-2:3,3-64:0")
    configs = serving.serving_configs("head", args)
    assert [c.name for c in configs] == ["none", "eagle3-3", "eagle3-k-by-batch"]
    assert configs[-1].speculative_config["num_speculative_tokens_per_batch_size"] == [[1, 2, 3], [3, 64, 0]]
    args.k_by_batch = "none"
    assert [c.name for c in serving.serving_configs("head", args)] == ["none", "eagle3-3"]
    with pytest.raises(SystemExit):
        serving.main(["--k-by-batch", "3-1:2"])
    assert "--k-by-batch: K-by-batch schedule '3-1:2'" in capsys.readouterr().err


def test_failed_server_start_is_reported_and_cleaned_up(tmp_path):
    from vllm_respsp.testbed.server import start_server

    with pytest.raises(RuntimeError, match="exited"):
        start_server(str(tmp_path / "no-such-model"), log_path=tmp_path / "server.log", startup_timeout=120)


def test_serving_run_on_fixtures(fixture_models, tmp_path):
    """none + respsp trees on the successor pair: every request answered with all its tokens,
    the trees' acceptance seen through /metrics, outputs written, every server stopped."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"text": t, "kind": "completion"}) for t in ["w5 w6 w7", "w9 w10"]))
    out = serving.main(["--model", str(fixture_models["successor"]), "--head", str(fixture_models["successor_head"]),
                        "--prompt-sets", str(prompts), "--concurrencies", "1", "2", "--request-rates", "8",
                        "--num-prompts", "2", "--max-tokens", "6", "--chains", "--respsp", "T4/D2/K2",
                        "--varying-load", "1x2,2x4",
                        "--max-model-len", "256", "--dtype", "float32", "--out", str(tmp_path / "run")])
    result = json.loads((out / "serving.json").read_text())
    assert result["complete"] and [c["name"] for c in result["configs"]] == ["none", "respsp-T4/D2/K2"]
    assert [(c["load"], c["requests"]) for c in result["cells"]] == \
        [("c1", 2), ("c2", 4), ("8/s", 2), ("varying[1x2,2x4]", 6)]
    varying = result["cells"][3]["configs"]["respsp-T4/D2/K2"]  # whole run, then phase by phase
    assert varying["completed"] == 6 and [p["completed"] for p in varying["phases"]] == [2, 4]
    assert all(p["tpot_ms"]["p50"] > 0 and p["ttft_ms"]["p99"] > 0 for p in varying["phases"])
    for cell in result["cells"]:
        none, tree = cell["configs"]["none"], cell["configs"]["respsp-T4/D2/K2"]
        assert none["failed"] == tree["failed"] == 0 and none["completed"] == cell["requests"]
        assert none["acceptance_length"] == 1.0 and none["speedup_vs_none"] == 1.0
        assert tree["acceptance_length"] > 2.5  # the successor head is always right: depth 2 accepted
        assert tree["speedup_vs_best_eagle3"] is None and tree["ttft_ms"]["p50"] > 0
    raw = result["raw"][str(prompts)]["c2"]["respsp-T4/D2/K2"][0]
    assert raw["output_lens"] == [6] * 4 and len(raw["itls"]) == 4
    table = (out / "serving.md").read_text()
    assert table.count("\n| p.jsonl |") == 12 and "respsp T4/D2/K2" in table  # 4 loads + 2 phases, x2
    assert "| phase 2: c2 |" in table
    assert (out / "serving_throughput.png").is_file() and (out / "serving_acceptance.png").is_file()
    assert len(result["server_starts"]) == 2
    for start in result["server_starts"]:  # the servers are gone: their ports refuse connections
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", start["port"]), timeout=2).close()
