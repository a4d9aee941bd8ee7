"""Tree attention and KV compaction over vLLM's Triton attention (TRITON_ATTN), the backend vLLM
ships for every GPU vendor, and over its FlashAttention backend (FLASH_ATTN), with the kernels of
`vllm_respsp_triton`.

vLLM hands each layer a logical view `[num_blocks, num_kv_heads, block_size, 2 * head_size]` whose
content is `[K | V]` per (token, head); its physical order is whatever `KVCacheLayout` vLLM
negotiated (NHD by default: memory `[blocks, tokens, heads, 2 * head_size]`). TRITON_ATTN's own
`do_kv_cache_update` reads it as `kv_cache.transpose(1, 2).split(head_size, -1)`; so do we, which
gives the `[blocks, block_size, heads, head_size]` K and V views `tree_attention` takes (strides
passed through, zero copies) and the `[2, blocks, block_size, heads, head_size]` planes
`compact_kv` takes. FLASH_ATTN's `do_kv_cache_update` reads its cache through the very same
view, so the same backend serves it. tests/triton_layout_job.py checks both against vLLM's own
`triton_reshape_and_cache_flash` (FLASH_ATTN's CUDA-only `reshape_and_cache_flash` writes the
same views).

vLLM's unified attention computes the tree rows causally first (it knows no tree masks); the
tree kernel then writes their real outputs. Both run on the device: no host synchronisation per
layer (the plan's tensors are copied to the device once per step).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vllm_respsp.backends.base import TreeAttentionBackend, unique_caches
from vllm_respsp.tree.step_trees import StepTrees
from vllm_respsp_triton import compact_kv, tree_attention


def kv_views(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V), each [num_blocks, block_size, num_kv_heads, head_size], zero-copy."""
    k, v = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return k, v


def kv_planes(kv_cache: torch.Tensor) -> torch.Tensor:
    """[2, num_blocks, block_size, num_kv_heads, head_size] (K plane, V plane), zero-copy."""
    head_size = kv_cache.shape[-1] // 2
    return kv_cache.transpose(1, 2).unflatten(-1, (2, head_size)).permute(3, 0, 1, 2, 4)


class TritonPlan(NamedTuple):
    block_table: torch.Tensor  # int32 [M, max_blocks] of the requests with real trees
    prefix_lens: torch.Tensor  # int32 [M]
    cu_nodes: torch.Tensor  # int32 [M + 1]
    ancestor_bits: torch.Tensor  # int32 [rows, words]


class TritonTreeBackend(TreeAttentionBackend):
    vllm_backend = "TRITON_ATTN"

    def layout_error(self, layers: list) -> str | None:
        for layer in unique_caches(layers):
            cache = layer.kv_cache
            if cache.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                return f"a {cache.dtype} (quantized) KV cache"
            if kv_views(cache, cache.shape[-1] // 2)[0].stride(-1) != 1:
                return f"a KV cache layout whose head dimension is not contiguous (strides {cache.stride()})"
        return None

    def plan(self, trees: StepTrees, attn_metadata, kv_cache: torch.Tensor) -> TritonPlan:
        device = kv_cache.device
        masked = trees.masked.to(device)
        return TritonPlan(attn_metadata.block_table[trees.batch_index.to(device)[masked]],
                          trees.prefix_lens.to(device)[masked], trees.masked_cu.to(device),
                          trees.masked_bits.to(device))

    def attend_rows(self, plan: TritonPlan, impl, q, kv_cache, layer) -> torch.Tensor:
        k, v = kv_views(kv_cache, impl.head_size)
        return tree_attention(q, k, v, plan.block_table, plan.prefix_lens, plan.cu_nodes,
                              plan.ancestor_bits, impl.scale)

    def compact(self, layers: list, src: torch.Tensor, dst: torch.Tensor) -> None:
        caches = [kv_planes(layer.kv_cache) for layer in unique_caches(layers)]
        if caches:
            device = caches[0].device
            compact_kv(caches, src.to(device).view(1, -1), dst.to(device).view(1, -1))

    def write_rows(self, layer, slots, k, v) -> None:
        keys, values = kv_views(layer.kv_cache, layer.kv_cache.shape[-1] // 2)
        slots = slots.to(keys.device)
        at = (slots // keys.shape[1], slots % keys.shape[1])
        keys[at], values[at] = k.to(keys.dtype), v.to(values.dtype)  # indexing the views writes the cache

    def read_blocks(self, layer, blocks):
        blocks = blocks.to(layer.kv_cache.device)
        return tuple(t[blocks].flatten(-4, -3) for t in kv_views(layer.kv_cache, layer.kv_cache.shape[-1] // 2))


class FlashTreeBackend(TritonTreeBackend):
    """FLASH_ATTN: the layout and the metadata's `block_table` are TRITON_ATTN's (see above)."""

    vllm_backend = "FLASH_ATTN"
