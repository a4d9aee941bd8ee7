"""Micro-benchmark: the cost of one batched ShapePolicy call (not a test; prints figures).

    python -m vllm_respsp.engine_tools.bench_policy [--batch 64] [--hidden 576]
    python -m vllm_respsp.engine_tools.bench_policy --engine POLICY_FILE [--batch 64]

Without --engine: a policy of the shipped architecture (projection 32, trunk 64x64) for EAGLE-3
fused features of the given hidden size (3 x hidden wide), `forward` (the network call, one per
engine step) and `choose` (with per-request hold bookkeeping) timed on random features.

--engine: the testbed target and shipped head in vLLM with that policy file, `--batch` random
prompts decoded together; the runtime's own timer of the shape choice (features, network,
holds) against the engine's wall time per step: the share of a step the policy costs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from vllm_respsp import envs
from vllm_respsp.policy.network import PolicyNet
from vllm_respsp.policy.shape_policy import ShapePolicy
from vllm_respsp.policy.train import synthetic_action_set
from vllm_respsp.tree.shape import TreeShape


def timed(fn, repeats: int) -> list[float]:
    for _ in range(10):  # warm-up: allocator, OpenMP pool
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=576, help="target hidden size")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the engine owns the rest)")
    ap.add_argument("--engine", metavar="POLICY_FILE", default=None,
                    help="measure the policy's share of real engine steps instead")
    ap.add_argument("--tokens", type=int, default=48, help="--engine: output tokens per prompt")
    args = ap.parse_args(argv)
    if args.engine:
        return engine_share(args.engine, args.batch, args.tokens)
    torch.set_num_threads(args.threads)
    actions = synthetic_action_set()
    feature_dim = 3 * args.hidden
    net = PolicyNet(feature_dim, 2, len(actions), proj_dim=32, hidden=(64, 64))
    policy = ShapePolicy(net, actions, TreeShape(16, 5, 4), hold=1)
    feats, recent = torch.randn(args.batch, feature_dim), torch.rand(args.batch) * 3
    ids = list(range(args.batch))
    fwd = timed(lambda: policy(feats, recent, args.batch), args.repeats)
    cho = timed(lambda: policy.choose(ids, feats, recent, args.batch), args.repeats)
    result = {"batch": args.batch, "feature_dim": feature_dim, "actions": len(actions),
              "threads": args.threads,
              "forward_ms_median": 1e3 * statistics.median(fwd),
              "choose_ms_median": 1e3 * statistics.median(cho),
              "forward_ms_p90": 1e3 * sorted(fwd)[int(0.9 * len(fwd))]}
    print(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return result


def engine_share(policy: str, batch: int, tokens: int) -> dict:
    import json
    import os
    import tempfile

    from vllm_respsp.draft import shipped_head_path
    from vllm_respsp.engine_tools.profile import random_prompts
    from vllm_respsp.testbed.engines import EngineConfig, EngineWorker
    from vllm_respsp.testbed.model import testbed_model_path

    model, head = str(testbed_model_path()), str(shipped_head_path())
    stats = Path(tempfile.mkdtemp(prefix="respsp-bench-policy-")) / "stats.json"
    os.environ[envs.STATS_FILE] = str(stats)
    spec = {"method": "respsp", "model": head, "policy": policy}
    worker = EngineWorker(model, EngineConfig("policy", spec, {"dtype": "bfloat16", "max_num_seqs": batch}))
    try:
        worker.wait_ready()
        vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
        sampling = {"temperature": 0.0, "max_tokens": tokens, "ignore_eos": True}
        worker.generate(random_prompts(batch, 64, vocab, seed=1), {**sampling, "max_tokens": 4})  # warm-up
        before = json.loads(stats.read_text())
        run = worker.generate(random_prompts(batch, 256, vocab, seed=0), sampling)
        after = json.loads(stats.read_text())
    finally:
        worker.close()
    steps = after["steps"] - before["steps"]
    choose = after["seconds"].get("choose_shapes", 0.0) - before["seconds"].get("choose_shapes", 0.0)
    result = {"batch": batch, "steps": steps, "step_ms": 1e3 * run["seconds"] / steps,
              "choose_ms_per_step": 1e3 * choose / steps, "share_of_step": choose / run["seconds"],
              "fallbacks": after["fallbacks"]}
    print(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
