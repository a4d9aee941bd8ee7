"""Correctness and timing of the draft-tree Triton kernels against their
PyTorch references.

Needs only torch and triton (no vLLM); run from the repository root:

    python3 benchmarks/gpu_kernels.py            # full run on a CUDA GPU
    python3 benchmarks/gpu_kernels.py --quick    # fewer shapes, shorter timing
    python3 benchmarks/gpu_kernels.py --quick --cpu   # smoke test: interpreter

Sections: (a) kernel vs reference correctness; (b)+(c) tree attention at the
Llama-3-8B shape (32 q heads, 8 KV heads, head 128, bf16, block 16), 64-node
trees, batch x context grid: time, reference time, and achieved bandwidth as
a fraction of the HBM bandwidth measured by a large device-to-device copy;
(d) metadata + acceptance + compaction (32 layers) per step, against an
estimated Llama-8B verification step.

Step estimate (d): per layer, the measured bf16 matmul chain
qkv [4096 -> 6144], o [4096 -> 4096], gate_up [4096 -> 28672],
down [14336 -> 4096] on the batch's B*64 tree tokens, times 32 layers, plus
32 times the measured tree attention at context 512.  Norms, RoPE, the
activation, the LM head and sampling are left out, so the estimate is low and
the overhead fraction is an upper bound.

JSON goes to $OUT/gpu_kernels.json when $OUT is set, else to
benchmarks/results/gpu_kernels.json.  Exit status 1 if any correctness check
fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

if "--cpu" in sys.argv:  # must precede the triton import (see _dispatch)
    os.environ["TRITON_INTERPRET"] = "1"
# The source folder itself (installed, it is `vllm_respsp_triton`): this script also runs
# from a bare checkout, on a GPU machine with nothing installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402

import vllm_respsp_triton as tk  # noqa: E402

LLAMA_8B = dict(num_q_heads=32, num_kv_heads=8, head_size=128, layers=32, hidden=4096, ffn=14336)
TREE_NODES = 64
BLOCK = 16


# ---- trees and batches -----------------------------------------------------


def layered_tree(n_nodes: int, depth: int, rng: random.Random) -> list[int]:
    """BFS-ordered EAGLE-like tree: n_nodes-1 drafts spread over ``depth``
    levels, each node's parent drawn from the previous level."""
    parents, prev = [-1], [0]
    drafts = n_nodes - 1
    for level in range(depth):
        size = drafts // depth + (level < drafts % depth)
        if size == 0:
            break
        first = len(parents)
        parents += sorted(rng.choice(prev) for _ in range(size))
        prev = list(range(first, len(parents)))
    return parents


def edge_trees(rng: random.Random) -> list[list[int]]:
    """Root only, a chain, a random (non-BFS) tree, and 128 drafts of depth 8
    with two fan-out-32 nodes."""
    big = [-1] + [0] * 32 + [1] * 32
    prev = list(range(33, 65))
    for size in (11, 11, 11, 11, 10, 10):
        first = len(big)
        big += sorted(rng.choice(prev) for _ in range(size))
        prev = list(range(first, len(big)))
    chain = [-1] + list(range(8))
    random_tree = [-1] + [rng.randrange(i) for i in range(1, 50)]
    return [[-1], chain, random_tree, big]


def make_batch(trees, prefixes, device, dtype, shape, seed):
    """Paged cache (shuffled blocks) with random K/V, q, and tree metadata."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    parents = torch.tensor([p for t in trees for p in t], dtype=torch.int32)
    cu = [0]
    for t in trees:
        cu.append(cu[-1] + len(t))
    pages = [-(-(p + len(t)) // BLOCK) for p, t in zip(prefixes, trees)]
    num_blocks = sum(pages) + 1
    ids = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(trees), max(pages), dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        table[b, :n] = ids[used : used + n]
        used += n
    hkv, hq, d = shape["num_kv_heads"], shape["num_q_heads"], shape["head_size"]
    k = torch.randn(num_blocks, BLOCK, hkv, d, device=device, dtype=dtype)
    v = torch.randn(num_blocks, BLOCK, hkv, d, device=device, dtype=dtype)
    q = torch.randn(cu[-1], hq, d, device=device, dtype=dtype)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    return dict(
        q=q, k=k, v=v, table=table.to(device), cu=cu_t, parents=parents.to(device),
        prefixes=torch.tensor(prefixes, dtype=torch.int32, device=device),
        max_nodes=max(len(t) for t in trees), trees=trees,
    )


def attention_args(batch, ancestor_bits):
    return (batch["q"], batch["k"], batch["v"], batch["table"], batch["prefixes"], batch["cu"],
            ancestor_bits, batch["q"].shape[-1] ** -0.5)


def tokens_for(trees, rng, device):
    """Draft/target tokens with long greedy matches (vocab 4)."""
    draft, target = [], []
    for parents in trees:
        d = [rng.randrange(4) for _ in parents]
        t = [rng.randrange(4) for _ in parents]
        for i, p in enumerate(parents):
            if p >= 0 and rng.random() < 0.8:
                t[p] = d[i]
        draft += d
        target += t
    return (torch.tensor(draft, device=device), torch.tensor(target, device=device))


# ---- timing ----------------------------------------------------------------


def bench_us(fn, device: str, rep_ms: int) -> float:
    if device == "cuda":
        return 1e3 * triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms,
                                             return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def hbm_bandwidth(device: str, rep_ms: int, quick: bool) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    n = (1 << 20) if device == "cpu" else (1 << 28 if quick else 1 << 29)  # bytes of bf16
    src = torch.empty(n // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src), device, rep_ms)
    return 2 * n / (us * 1e-6)


# ---- (a) correctness -------------------------------------------------------


def check_correctness(device: str, shape) -> list[dict]:
    rng = random.Random(0)
    trees = edge_trees(rng) + [layered_tree(64, 8, rng) for _ in range(3)]
    prefixes = [0, BLOCK - 1, BLOCK, 2 * BLOCK + 1, 37, 3 * BLOCK, BLOCK - 2][: len(trees)]
    checks = []

    def record(name, ok, err=0.0):
        checks.append(dict(check=name, ok=bool(ok), max_error=float(err)))

    batch = make_batch(trees, prefixes, device, torch.bfloat16, shape, seed=1)
    meta = tk.build_tree_metadata(batch["parents"], batch["cu"], tk.MAX_TREE_NODES)
    meta_ref = tk.build_tree_metadata_ref(batch["parents"], batch["cu"], tk.MAX_TREE_NODES)
    record("build_tree_metadata", all(torch.equal(a, b) for a, b in zip(meta, meta_ref)))

    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float16, 4e-3), (torch.float32, 2e-4)):
        for key in ("q", "k", "v"):
            batch[key] = batch[key].to(dtype)
        args = attention_args(batch, meta.ancestor_bits)
        err = (tk.tree_attention(*args).float() - tk.tree_attention_ref(*args).float()).abs().max()
        record(f"tree_attention_{str(dtype)[6:]}", err <= tol, err)

    draft, target = tokens_for(trees, rng, device)
    acc_args = (draft, target, meta.first_child, meta.next_sibling, batch["cu"], 8)
    got, want = tk.accept_greedy(*acc_args), tk.accept_greedy_ref(*acc_args)
    record("accept_greedy", all(torch.equal(a, b) for a, b in zip(got, want)))

    accepted_len, accepted_nodes, _ = want
    src, dst = tk.compaction_slots(batch["prefixes"], accepted_nodes, accepted_len, batch["table"], BLOCK)
    layers = [torch.randn(2, *batch["k"].shape, device=device).to(torch.bfloat16) for _ in range(4)]
    ref_layers = [t.clone() for t in layers]
    tk.compact_kv(layers, src, dst)
    tk.compact_kv_ref(ref_layers, src, dst)
    moved = int((src >= 0).sum())
    record(f"compact_kv ({moved} rows moved)",
           moved > 0 and all(torch.equal(a, b) for a, b in zip(layers, ref_layers)))
    return checks


# ---- (c) attention grid and (d) per-step overhead --------------------------


def attention_grid(device, shape, batches, contexts, rep_ms, bandwidth):
    rows = []
    for ctx in contexts:
        for num_requests in batches:
            rng = random.Random(num_requests * 7 + ctx)
            trees = [layered_tree(TREE_NODES, 8, rng) for _ in range(num_requests)]
            batch = make_batch(trees, [ctx] * num_requests, device, torch.bfloat16, shape, seed=2)
            meta = tk.build_tree_metadata(batch["parents"], batch["cu"], TREE_NODES)
            args = attention_args(batch, meta.ancestor_bits)
            kernel_us = bench_us(lambda: tk.tree_attention(*args), device, rep_ms)
            ref_us = bench_us(lambda: tk.tree_attention_ref(*args), device, max(rep_ms // 2, 1))
            elem = batch["q"].element_size()
            kv_bytes = num_requests * (ctx + TREE_NODES) * 2 * shape["num_kv_heads"] * shape["head_size"] * elem
            q_out_bytes = 2 * batch["q"].numel() * elem
            achieved = (kv_bytes + q_out_bytes) / (kernel_us * 1e-6)
            rows.append(dict(batch=num_requests, context=ctx, kernel_us=kernel_us, ref_us=ref_us,
                             speedup=ref_us / kernel_us, achieved_GBps=achieved / 1e9,
                             frac_of_hbm=achieved / bandwidth))
    return rows


def matmul_chain_us(tokens, device, shape, rep_ms):
    """One layer's projection GEMMs (Llama-8B) on ``tokens`` rows, bf16."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    h, f = shape["hidden"], shape["ffn"]
    kv = shape["num_kv_heads"] * shape["head_size"]
    x = torch.randn(tokens, h, device=device, dtype=dtype)
    weights = [torch.randn(h, n, device=device, dtype=dtype) * 0.01 for n in (h + 2 * kv, h, 2 * f)]
    down = torch.randn(f, h, device=device, dtype=dtype) * 0.01

    def chain():
        qkv = x @ weights[0]
        o = qkv[:, :h] @ weights[1]
        gate_up = o @ weights[2]
        return gate_up[:, :f] @ down

    return bench_us(chain, device, rep_ms)


def step_overhead(device, shape, batches, ctx, rep_ms, attention_us):
    rows = []
    layers_n = shape["layers"]
    for num_requests in batches:
        rng = random.Random(num_requests)
        trees = [layered_tree(TREE_NODES, 8, rng) for _ in range(num_requests)]
        batch = make_batch(trees, [ctx] * num_requests, device, torch.bfloat16, shape, seed=3)
        kv_layers = [torch.empty(2, *batch["k"].shape, device=device, dtype=torch.bfloat16)
                     for _ in range(layers_n)]
        draft, target = tokens_for(trees, rng, device)
        parents, cu, max_nodes = batch["parents"], batch["cu"], TREE_NODES

        def step(meta_fn, accept_fn, compact_fn):
            meta = meta_fn(parents, cu, max_nodes)
            n_acc, nodes, _ = accept_fn(draft, target, meta.first_child, meta.next_sibling, cu, 8)
            src, dst = tk.compaction_slots(batch["prefixes"], nodes, n_acc, batch["table"], BLOCK)
            compact_fn(kv_layers, src, dst)

        kernel_us = bench_us(lambda: step(tk.build_tree_metadata, tk.accept_greedy, tk.compact_kv),
                             device, rep_ms)
        ref_us = bench_us(lambda: step(tk.build_tree_metadata_ref, tk.accept_greedy_ref,
                                       tk.compact_kv_ref), device, max(rep_ms // 2, 1))
        meta = tk.build_tree_metadata(parents, cu, max_nodes)
        parts = {
            "metadata_us": bench_us(lambda: tk.build_tree_metadata(parents, cu, max_nodes), device, rep_ms),
            "accept_us": bench_us(lambda: tk.accept_greedy(draft, target, meta.first_child,
                                                           meta.next_sibling, cu, 8), device, rep_ms),
        }
        gemm_us = matmul_chain_us(num_requests * TREE_NODES, device, shape, rep_ms)
        step_us = layers_n * (gemm_us + attention_us.get(num_requests, 0.0))
        rows.append(dict(batch=num_requests, context=ctx, overhead_us=kernel_us, overhead_ref_us=ref_us,
                         **parts, est_step_us=step_us, overhead_frac=kernel_us / step_us))
    return rows


def markdown(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    parser.add_argument("--cpu", action="store_true", help="interpreter smoke test, tiny sizes")
    opts = parser.parse_args()
    device = "cpu" if opts.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --cpu for the interpreter smoke test")
    if opts.cpu:
        shape = dict(num_q_heads=4, num_kv_heads=2, head_size=64, layers=2, hidden=64, ffn=128)
        batches, contexts, rep_ms = [1, 2], [32], 1
    else:
        shape = dict(LLAMA_8B)
        batches = [1, 8, 32, 64]
        contexts = [512, 4096]
        rep_ms = 25 if opts.quick else 100
    global TREE_NODES
    if opts.cpu:
        TREE_NODES = 8
    torch.manual_seed(0)

    result = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
                  torch=torch.__version__, triton=triton.__version__, shape=shape,
                  tree_nodes=TREE_NODES, quick=opts.quick)
    result["correctness"] = check_correctness(device, shape)
    print("## (a) correctness: kernel vs reference\n")
    print(markdown(result["correctness"], ["check", "ok", "max_error"]), "\n")

    bandwidth = hbm_bandwidth(device, rep_ms, opts.quick)
    result["hbm_GBps"] = bandwidth / 1e9
    print(f"measured copy bandwidth: {bandwidth / 1e9:.0f} GB/s\n")

    result["attention"] = attention_grid(device, shape, batches, contexts, rep_ms, bandwidth)
    print(f"## (b, c) tree attention, {TREE_NODES}-node trees, bf16\n")
    print(markdown(result["attention"], ["batch", "context", "kernel_us", "ref_us", "speedup",
                                         "achieved_GBps", "frac_of_hbm"]), "\n")

    overhead_ctx = min(contexts)
    attention_us = {r["batch"]: r["kernel_us"] for r in result["attention"] if r["context"] == overhead_ctx}
    result["step_overhead"] = step_overhead(device, shape, batches, overhead_ctx, rep_ms, attention_us)
    print(f"## (d) metadata + acceptance + compaction ({shape['layers']} layers) per step\n")
    print(markdown(result["step_overhead"], ["batch", "metadata_us", "accept_us", "overhead_us",
                                             "overhead_ref_us", "est_step_us", "overhead_frac"]))

    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "gpu_kernels.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {path}")
    if not all(c["ok"] for c in result["correctness"]):
        sys.exit("correctness check FAILED")


if __name__ == "__main__":
    main()
