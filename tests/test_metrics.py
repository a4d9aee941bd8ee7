"""The respsp fallback counter crosses from the engine-core process to the front end's /metrics."""

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from conftest import BASE_ENV, REPO

FRONTEND = r"""
import json, multiprocessing, os, sys
from vllm_respsp.runtime import metrics

def engine_core():  # a child process, as vLLM's engine core is
    from vllm_respsp.runtime import metrics
    metrics.record_fallback("drafter_error")
    metrics.record_fallback("drafter_error")
    metrics.record_fallback("chain_for_seed", 3)
    metrics.record_shape("T8/D4/K2")

if __name__ == "__main__":
    path = metrics.setup_frontend()
    assert metrics.setup_frontend() == path  # idempotent
    for _ in range(2):  # a restarted engine core (new pid) adds to the same counters
        child = multiprocessing.get_context("spawn").Process(target=engine_core)
        child.start(); child.join()
        assert child.exitcode == 0
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from vllm.v1.metrics.prometheus import get_prometheus_registry
        registry = get_prometheus_registry()  # what vLLM's /metrics serves in multiprocess mode
    else:
        from prometheus_client import REGISTRY as registry
    from prometheus_client import generate_latest
    print("METRICS " + json.dumps(generate_latest(registry).decode()))
"""


def scrape(env: dict, tmp_path) -> dict[str, float]:
    script = tmp_path / "frontend.py"  # spawn re-imports the main module: a file, not `-c`
    script.write_text(FRONTEND)
    out = subprocess.run([sys.executable, str(script)], cwd=REPO, env={**BASE_ENV, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    text = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("METRICS "))[8:])
    return {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
            if l.startswith("vllm:respsp_")}


def test_counters_written_by_a_child_process_are_collected_by_the_front_end(tmp_path):
    expected = {'vllm:respsp_fallbacks_total{kind="drafter_error"}': 4.0,
                'vllm:respsp_fallbacks_total{kind="chain_for_seed"}': 6.0,
                'vllm:respsp_tree_shapes_total{shape="T8/D4/K2"}': 2.0}
    assert scrape({}, tmp_path) == expected  # a private directory in prometheus_client's default registry
    shared = tmp_path / "prometheus"
    shared.mkdir()
    # vLLM's own multiprocess mode (--api-server-count > 1, or set by the user)
    assert scrape({"PROMETHEUS_MULTIPROC_DIR": str(shared)}, tmp_path) == expected


def test_record_without_a_front_end_is_a_no_op():
    code = ("import os; os.environ.pop('VLLM_RESPSP_METRICS_DIR', None); "
            "os.environ.pop('PROMETHEUS_MULTIPROC_DIR', None); "
            "from vllm_respsp.runtime import metrics; metrics.record_fallback('x'); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=BASE_ENV, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_server_metrics_count_each_drafter_failure(fixture_models, tmp_path):
    """Every draft step failing (fault injection): answers stay exact, an empty prompt gets HTTP
    400 as without speculation, and the server's /metrics shows
    `vllm:respsp_fallbacks_total{kind="drafter_error"}` equal to the runtime's own count."""
    from test_cli import completion, respsp_server

    model = str(fixture_models["successor"])
    spec = {"method": "respsp", "model": str(fixture_models["successor_head"]),
            "shape": {"total_tokens": 8, "depth": 4, "top_k": 2}}
    stats = tmp_path / "stats.json"
    env = {"RESPSP_TEST_FAULT": "drafter_raises", "VLLM_RESPSP_STATS_FILE": str(stats)}
    with respsp_server(model, spec, tmp_path, env) as server:
        # an empty prompt is refused by the front end, as without speculation; serving goes on
        with pytest.raises(urllib.error.HTTPError) as refused:
            completion(server.base, {"model": model, "prompt": "", "max_tokens": 4})
        assert refused.value.code == 400 and "non-empty" in refused.value.read().decode()
        for start in (5, 40):
            body = {"model": model, "prompt": f"w{start}", "max_tokens": 6, "temperature": 0.0,
                    "ignore_eos": True}
            words = completion(server.base, body)["choices"][0]["text"].split()
            assert words == [f"w{start + 1 + i}" for i in range(6)]
        metrics = urllib.request.urlopen(server.base + "/metrics", timeout=10).read().decode()
        counted = json.loads(stats.read_text())["fallbacks"]
    line = next(l for l in metrics.splitlines()
                if l.startswith('vllm:respsp_fallbacks_total{kind="drafter_error"}'))
    assert float(line.rsplit(" ", 1)[1]) == counted["drafter_error"] > 0
    assert "# TYPE vllm:respsp_fallbacks_total counter" in metrics
