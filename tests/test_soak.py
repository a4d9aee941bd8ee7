"""A bounded soak test: many concurrent streaming clients with mixed parameters against the
OpenAI server running respsp trees. Zero errors, nothing lost or truncated, every greedy answer
exact, per-request state released, engine memory flat.

`RESPSP_SOAK_REQUESTS` (default 160) and `RESPSP_SOAK_CLIENTS` (default 16) size it; a manual
run of a few thousand requests is the same test with bigger numbers."""

import json
import os
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from test_cli import respsp_server

REQUESTS = int(os.environ.get("RESPSP_SOAK_REQUESTS", "160"))
CLIENTS = int(os.environ.get("RESPSP_SOAK_CLIENTS", "16"))


def rss_kib(pid: int) -> int:
    """Resident memory of a process and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += int(next(l for l in open(f"/proc/{p}/status") if l.startswith("VmRSS")).split()[1])
            todo += [int(c) for c in open(f"/proc/{p}/task/{p}/children").read().split()]
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            pass
    return total


def stream(base: str, body: dict) -> tuple[str, str | None]:
    """A streamed completion: (the concatenated text, finish reason of the last event)."""
    req = urllib.request.Request(base + "/v1/completions", json.dumps({**body, "stream": True}).encode(),
                                 {"Content-Type": "application/json"})
    text, finish = "", None
    with urllib.request.urlopen(req, timeout=300) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            choice = json.loads(line[5:])["choices"][0]
            text += choice["text"]
            finish = choice.get("finish_reason") or finish
    return text, finish


def test_soak_streaming_clients_against_respsp_trees(fixture_models, tmp_path):
    model = str(fixture_models["successor"])
    spec = {"method": "respsp", "model": str(fixture_models["successor_head"]), "policy": "cycle",
            "actions": [{"total_tokens": 4, "depth": 4, "top_k": 1},
                        {"total_tokens": 8, "depth": 4, "top_k": 2},
                        {"total_tokens": 24, "depth": 3, "top_k": 4}]}
    stats = tmp_path / "stats.json"
    with respsp_server(model, spec, tmp_path, {"VLLM_RESPSP_STATS_FILE": str(stats)}) as server:
        base = server.base
        bodies, expected = [], []
        for i in range(REQUESTS):
            start, max_tokens = 3 + i % 90, 1 + (7 * i) % 40
            words = [f"w{(start + 1 + j) % 128}" for j in range(max_tokens)]
            body = {"model": model, "prompt": f"w{start} " * (1 + i % 3), "max_tokens": max_tokens,
                    "temperature": [0.0, 0.8, 0.0, 1.0][i % 4], "ignore_eos": True}
            if i % 5 == 4 and max_tokens > 3:
                body["stop"] = [" " + words[2]]
                words = words[:2]
            bodies.append(body)
            expected.append(words)

        def run_all():
            with ThreadPoolExecutor(CLIENTS) as pool:
                return list(pool.map(lambda b: stream(base, b), bodies))

        run_all()  # warm-up pass: allocator pools and caches settle
        memory_before = rss_kib(server.pid)
        answers = run_all()
        memory_after = rss_kib(server.pid)
        for body, (text, finish), words in zip(bodies, answers, expected):
            assert text.split() == words, body
            assert finish == ("stop" if "stop" in body else "length"), body
        assert memory_after - memory_before < 100 * 1024, (memory_before, memory_after)  # KiB
        state = json.loads(stats.read_text())
        assert not state["fallbacks"] and state["live_draft_contexts"] <= CLIENTS
