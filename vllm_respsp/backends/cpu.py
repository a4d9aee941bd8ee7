"""Tree attention and KV compaction over vLLM's CPU attention (CPU_ATTN) cache.

vLLM's CPU kernel knows causal masks only: the tree rows of a step are computed by it like a
chain (their K/V land in the cache at their own slots), then overwritten here with attention
through each node's ancestor mask, all requests in one padded SDPA call per layer
(`cpu_paged_kv.TreeAttentionPlan`, planned once per step). The cache's packing depends on the
attention ISA vLLM picked per layer (`layer.isa`); `cpu_paged_kv` reads the ones it knows.
"""

from __future__ import annotations

import torch

from vllm_respsp.backends.base import TreeAttentionBackend, unique_caches
from vllm_respsp.backends.cpu_paged_kv import (
    SUPPORTED_ISAS,
    TreeAttentionPlan,
    compact_kv_cpu,
    kv_tiles,
    kv_views,
    write_slots,
)
from vllm_respsp.tree.step_trees import StepTrees


class CpuTreeBackend(TreeAttentionBackend):
    vllm_backend = "CPU_ATTN"

    def layout_error(self, layers: list) -> str | None:
        isas = {layer.isa for layer in layers if isinstance(getattr(layer, "isa", None), str)}
        unknown = sorted(isas - set(SUPPORTED_ISAS))
        if unknown:
            return f"the CPU KV cache layout(s) {unknown} (respsp reads {list(SUPPORTED_ISAS)})"
        return None

    def plan(self, trees: StepTrees, attn_metadata, kv_cache: torch.Tensor) -> TreeAttentionPlan:
        return TreeAttentionPlan.build(attn_metadata.block_table[trees.batch_index[trees.masked]],
                                       trees.prefix_lens[trees.masked], trees.masked_cu,
                                       trees.masked_bits, kv_cache.shape[2])

    def attend_rows(self, plan: TreeAttentionPlan, impl, q, kv_cache, layer) -> torch.Tensor:
        return plan.attend(q, kv_cache, layer.isa, impl.scale)

    def compact(self, layers: list, src: torch.Tensor, dst: torch.Tensor) -> None:
        by_isa: dict[str, list[torch.Tensor]] = {}
        for layer in unique_caches(layers):
            isa = getattr(layer, "isa", None)
            if isa is not None:
                by_isa.setdefault(isa, []).append(layer.kv_cache)
        for isa, caches in by_isa.items():
            compact_kv_cpu(caches, isa, src, dst)

    def write_rows(self, layer, slots, k, v) -> None:
        for view, rows in zip(kv_tiles(layer.kv_cache, layer.isa), (k, v)):
            write_slots(view, slots, rows.to(view.dtype))

    def read_blocks(self, layer, blocks):
        gathered = layer.kv_cache.index_select(0, blocks.reshape(-1))  # one copy per block
        return tuple(t.reshape(*blocks.shape[:-1], -1, *t.shape[2:]) for t in kv_views(gathered, layer.isa))
