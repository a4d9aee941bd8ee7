"""Micro-benchmark: the cost of one batched ShapePolicy call (not a test; prints figures).

    python -m vllm_respsp.policy.bench_policy [--batch 64] [--hidden 576] [--actions 184]

Builds a policy of the shipped architecture (projection 32, trunk 64x64) for EAGLE-3 fused
features of the given hidden size (3 x hidden wide), then times `forward` (the network call,
one per engine step) and `choose` (with per-request hold bookkeeping) on random features.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

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
    args = ap.parse_args(argv)
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


if __name__ == "__main__":
    main()
