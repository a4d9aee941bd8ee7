"""Host reads per engine step: vLLM's EAGLE-3 next to respsp, both on vLLM's GPU attention path.

A host read is a tensor call that copies a value back to Python (item, tolist, cpu, numpy,
bool/int/float of a tensor) or whose output size depends on tensor values (boolean-mask
indexing, nonzero, unique, bincount, repeat_interleave without output_size): on a GPU each one
waits for the device. There is no GPU
here, so the engines run vLLM's TRITON_ATTN on the CPU platform under TRITON_INTERPRET=1 (the
test hooks in tests/engine_hooks) with the tiny successor fixture, and every such call in the
worker's `execute_model`, `sample_tokens` and `take_draft_token_ids` is counted, by the line that made it.

What the count means: every tensor lives on the CPU here, so reads of host-side tensors (block
tables, tree metadata built on the host) are counted as well as reads of device results. It is
a like-for-like proxy between methods, not a profile of a GPU.

    python benchmarks/host_reads.py [--out benchmarks/results/host-reads-DATE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOOKS = REPO / "tests" / "engine_hooks"
TRITON_ON_CPU = {"TRITON_INTERPRET": "1", "RESPSP_TEST_TRITON_ATTN_ON_CPU": "1", "VLLM_USE_V2_MODEL_RUNNER": "0"}
PROMPTS = [[3], [4], [5], [6, 7]]


def configs(head: str) -> dict[str, dict]:
    return {
        "vLLM EAGLE-3 chain 3": {"method": "eagle3", "model": head, "num_speculative_tokens": 3},
        "respsp chain 3 (T3/D3/K1)": {"method": "respsp", "model": head, "policy": "static",
                                      "shape": {"total_tokens": 3, "depth": 3, "top_k": 1}},
        "respsp tree T8/D3/K3": {"method": "respsp", "model": head, "policy": "static",
                                 "shape": {"total_tokens": 8, "depth": 3, "top_k": 3}},
    }


def count(model: str, spec: dict, log: Path) -> list[Counter]:
    job = {"model": model, "prompts": PROMPTS,
           "samplings": [{"temperature": 0.0, "max_tokens": 12, "ignore_eos": True}],
           "engine": {"dtype": "float32", "max_model_len": 128, "max_num_seqs": 8},
           "speculative_config": spec}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    env = {**os.environ, **TRITON_ON_CPU, "VLLM_CPU_KVCACHE_SPACE": "1", "RESPSP_TEST_HOST_READS": str(log),
           "PYTHONPATH": os.pathsep.join(p for p in (str(HOOKS), os.environ.get("PYTHONPATH", "")) if p)}
    log.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "vllm_respsp.testbed.engine_run", "@" + f.name], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"engine run failed ({spec['method']}):\n{proc.stderr[-4000:]}")
    return [Counter(json.loads(line)) for line in log.read_text().splitlines()]


def summary(steps: list[Counter]) -> dict:
    decode = steps[1:]  # the first step is the prefill: no drafts to verify yet
    per_step = [sum(v for k, v in s.items() if ":" not in k) for s in decode]
    sites = Counter()
    for s in decode:
        sites.update({k: v for k, v in s.items() if ":" in k})
    return {"steps": len(decode), "median": statistics.median(per_step), "per_step": per_step,
            "by_package": {p: statistics.median(s.get(p, 0) for s in decode) for p in ("vllm", "vllm_respsp")},
            "sites_per_step": {k: round(v / len(decode), 2) for k, v in sorted(sites.items())}}


def main() -> None:
    from vllm_respsp.testbed.fixtures import build_all

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path,
                        default=REPO / "benchmarks" / "results" / f"host-reads-{time.strftime('%Y%m%d')}")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        models = build_all(Path(tmp) / "models")
        result = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
                  "prompts": PROMPTS, "configs": {}}
        for name, spec in configs(str(models["successor_head"])).items():
            result["configs"][name] = summary(count(str(models["successor"]), spec, Path(tmp) / "reads.jsonl"))
            print(f"{name}: {result['configs'][name]['median']} host reads per decode step", flush=True)
    (args.out / "host_reads.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"Command: `{result['command']}`  ", f"Date (UTC): {result['date']}", "",
             "| configuration | host reads per decode step (median) | by vLLM | by respsp |", "|---|---:|---:|---:|"]
    for name, s in result["configs"].items():
        lines.append(f"| {name} | {s['median']} | {s['by_package']['vllm']} | {s['by_package']['vllm_respsp']} |")
    (args.out / "host_reads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
