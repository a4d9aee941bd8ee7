"""respsp's Triton tree backend, one engine step's own work, on vLLM's TRITON_ATTN KV layout, at
Llama-3.1-8B and 70B shapes, beside causal attention over the same query tokens (torch SDPA):
what a tree costs over a chain on a GPU.

Needs only torch and triton (no vLLM); run from the repository root:

    python3 benchmarks/gpu_backend_step.py            # full run on a CUDA GPU (a few minutes)
    python3 benchmarks/gpu_backend_step.py --quick    # fewer cells
    python3 benchmarks/gpu_backend_step.py --quick --cpu   # smoke test: interpreter, tiny shapes

Per (model shape, batch, tree nodes), every request with a prefix of `--context` tokens and an
EAGLE-like tree in breadth-first order, the time of:
- plan: `StepTrees.build` (host: the step's trees over vLLM's flattened rows and slot mapping)
  plus `TritonTreeBackend.plan` (device copies), once per step;
- attend: the tree attention through the backend on vLLM's logical
  `[blocks, kv_heads, block_size, 2 * head_size]` view (NHD memory, vLLM's default layout),
  one call per layer, the model's layers back to back (synchronised once: their launches
  overlap as in a forward);
- accept: greedy acceptance (`accept_greedy`) with the tree metadata kernel;
- compact: the accepted paths' K/V moved in every layer (one launch);
- causal: torch SDPA of the same query tokens over prefix + themselves, causal, once per
  layer, back to back likewise: what a chain of that many tokens pays for attention.
JSON to $OUT/gpu_backend_step.json when $OUT is set, else benchmarks/results/gpu_backend_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

if "--cpu" in sys.argv:  # must precede the triton import (see vllm_respsp_triton._dispatch)
    os.environ["TRITON_INTERPRET"] = "1"
# From a bare checkout (a GPU machine with torch and triton only): the source folders themselves.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.gpu_kernels import layered_tree  # noqa: E402
from vllm_respsp.backends.triton import TritonTreeBackend  # noqa: E402
from vllm_respsp.tree.step_trees import ProposedTree, StepTrees  # noqa: E402
from vllm_respsp_triton import accept_greedy, build_tree_metadata  # noqa: E402

SHAPES = {
    "llama-3.1-8b": dict(num_q_heads=32, num_kv_heads=8, head_size=128, layers=32),
    "llama-3.1-70b": dict(num_q_heads=64, num_kv_heads=8, head_size=128, layers=80),
}
TINY = {"tiny": dict(num_q_heads=4, num_kv_heads=2, head_size=32, layers=2)}
BLOCK = 16


def step_inputs(batch: int, nodes: int, context: int, shape: dict, device, dtype, seed: int = 0):
    """vLLM-shaped inputs of one verification step: trees, flattened rows, slot mapping, block
    table and one layer's KV cache in TRITON_ATTN's logical view."""
    rng = random.Random(seed)
    depth = min(8, max(2, nodes.bit_length() - 1))  # 8 nodes: 3 levels; 64: 6 (EAGLE-like)
    trees = [layered_tree(nodes, depth, rng) for _ in range(batch)]
    depths = []
    for parents in trees:
        d = [0] * len(parents)
        for i, p in enumerate(parents[1:], 1):
            d[i] = d[p] + 1
        depths.append(d)
    blocks_per = -(-(context + nodes) // BLOCK)
    num_blocks = batch * blocks_per + 1
    order = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed))
    table = order.view(batch, blocks_per).to(torch.int32)
    positions = torch.arange(context, context + nodes)
    slots = (table[:, positions // BLOCK].long() * BLOCK + positions % BLOCK).reshape(-1)
    req_ids = [f"r{b}" for b in range(batch)]
    proposed = {r: ProposedTree([0] + list(range(1, nodes)), t, d) for r, t, d in zip(req_ids, trees, depths)}
    spec = {r: list(range(1, nodes)) for r in req_ids}
    query_start = np.arange(batch + 1) * nodes
    hkv, hs = shape["num_kv_heads"], shape["head_size"]
    memory = torch.randn(num_blocks, BLOCK, hkv, 2 * hs, device=device, dtype=dtype)  # NHD
    cache = memory.permute(0, 2, 1, 3)  # vLLM's logical [blocks, kv_heads, block_size, 2 * hs]
    return SimpleNamespace(trees=trees, req_ids=req_ids, proposed=proposed, spec=spec, query_start=query_start,
                           num_computed=np.full(batch, context), slots=slots.to(device), table=table.to(device),
                           cache=cache, memory=memory)


def timed(fn, device, reps: int, calls: int = 1) -> float:
    """Median milliseconds of `calls` back-to-back calls of `fn` (synchronised once, so their
    launches overlap as a forward's layers do) over `reps` samples, after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def measure(shape_name: str, shape: dict, batch: int, nodes: int, context: int, device, dtype, reps: int) -> dict:
    x = step_inputs(batch, nodes, context, shape, device, dtype)
    hq, hkv, hs, layers = shape["num_q_heads"], shape["num_kv_heads"], shape["head_size"], shape["layers"]
    backend = TritonTreeBackend()
    impl = SimpleNamespace(num_heads=hq, head_size=hs, scale=hs ** -0.5)
    rows = batch * nodes
    query = torch.randn(rows, hq, hs, device=device, dtype=dtype)
    output = torch.empty(rows, hq * hs, device=device, dtype=dtype)

    def build():
        return StepTrees.build(x.req_ids, x.spec, x.proposed, x.query_start, x.num_computed, x.slots)

    trees = build()
    metadata = SimpleNamespace(block_table=x.table)
    plan_ms = timed(lambda: (backend.plan(build(), metadata, x.cache)), device, reps)
    backend.attend(impl, None, query, x.cache, metadata, output, trees)  # plans once for the step
    attend_ms = timed(lambda: backend.attend(impl, None, query, x.cache, metadata, output, trees), device, reps,
                      calls=layers)

    parents = trees.parents.to(device)
    cu = trees.cu_nodes.to(device)
    tokens = torch.randint(0, 1000, (rows,), device=device)

    def accept():
        meta = build_tree_metadata(parents, cu, nodes)
        return accept_greedy(tokens, tokens, meta.first_child, meta.next_sibling, cu, int(trees.depths.max()))

    accept_ms = timed(accept, device, reps)
    # compaction of a depth-long accepted path per request, in `layers` layers (one view reused
    # for the timing's sake would let caches hit: use distinct layer tensors, up to 8, scaled)
    timed_layers = min(layers, 8)
    caches = [SimpleNamespace(kv_cache=x.cache.clone()) for _ in range(timed_layers)]
    depth = int(trees.depths.max())
    src = x.slots.view(batch, nodes)[:, -depth:].reshape(-1)
    dst = x.slots.view(batch, nodes)[:, 1:depth + 1].reshape(-1)
    compact_ms = timed(lambda: backend.compact(caches, src, dst), device, reps) * layers / timed_layers

    keys = torch.randn(batch, hkv, context + nodes, hs, device=device, dtype=dtype)
    values = torch.randn_like(keys)
    q = torch.randn(batch, hq, nodes, hs, device=device, dtype=dtype)
    causal = torch.ones(nodes, context + nodes, dtype=torch.bool, device=device).tril(context)
    causal_ms = timed(lambda: F.scaled_dot_product_attention(q, keys, values, attn_mask=causal,
                                                             enable_gqa=hq != hkv), device, reps, calls=layers)
    tree_step = plan_ms + attend_ms + accept_ms + compact_ms
    return {"shape": shape_name, "batch": batch, "tree_nodes": nodes, "context": context,
            "plan_ms": plan_ms, "attend_ms_per_layer": attend_ms / layers, "attend_ms": attend_ms,
            "accept_ms": accept_ms, "compact_ms": compact_ms, "causal_sdpa_ms_per_layer": causal_ms / layers,
            "causal_sdpa_ms": causal_ms, "tree_step_ms": tree_step, "tree_over_causal": tree_step / causal_ms}


def markdown(rows: list[dict]) -> str:
    cols = ["shape", "batch", "tree_nodes", "plan_ms", "attend_ms", "accept_ms", "compact_ms", "causal_sdpa_ms",
            "tree_over_causal"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="interpreter smoke test on tiny shapes")
    parser.add_argument("--context", type=int, default=512)
    args = parser.parse_args()
    if args.cpu:
        device, dtype, shapes, batches, trees, reps, context = torch.device("cpu"), torch.float32, TINY, [2], [8], 1, 40
    else:
        assert torch.cuda.is_available(), "no CUDA device visible (use --cpu for the interpreter smoke test)"
        device, dtype, shapes, reps, context = torch.device("cuda"), torch.bfloat16, SHAPES, 20, args.context
        batches, trees = ([1, 16, 64], [8, 64]) if args.quick else ([1, 4, 16, 64], [8, 16, 32, 64])
    rows = [measure(name, shape, b, n, context, device, dtype, reps)
            for name, shape in shapes.items() for b in batches for n in trees]
    print(markdown(rows))
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    (out / "gpu_backend_step.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
