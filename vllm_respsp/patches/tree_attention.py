"""Tree attention on vLLM's CPU backend, and the KV compaction that follows verification.

vLLM's CPU attention kernel knows causal masks only. The tree rows of a step are computed by
it like a chain (their K/V land in the cache at their own slots), then overwritten here with
attention through each node's ancestor mask (`tree_attention_cpu`, the PyTorch reference of
`triton_kernels.tree_attention`). Rows of chains and of requests without drafts are causal
already and are left as vLLM computed them.
"""

from __future__ import annotations

import torch

from vllm_respsp.patches.registry import Patch
from vllm_respsp.tree.cpu_paged_kv import TreeAttentionPlan, compact_kv_cpu


class CpuTreeAttention(Patch):
    name = "cpu_tree_attention"
    target = "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl.forward"

    def applies(self) -> bool:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()

    def replacement(self, original):
        def forward(impl, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
            result = original(impl, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
            trees = getattr(attn_metadata, "respsp_trees", None)
            if trees is None or impl.attn_type != "decoder":
                return result
            from vllm_respsp.runtime.runtime import timed

            with timed("tree_attention"):
                _tree_rows(impl, layer, query, kv_cache, attn_metadata, output, trees)
            return result

        return forward


def _tree_rows(impl, layer, query, kv_cache, attn_metadata, output, trees) -> None:
    """Overwrite the rows of non-chain trees with attention through their ancestor masks."""
    cached = getattr(attn_metadata, "respsp_plan", None)
    if cached is not None and cached[0] is trees:
        plan = cached[1]
    else:  # once per step: every layer shares the block table and the masks
        plan = TreeAttentionPlan.build(attn_metadata.block_table[trees.batch_index[trees.masked]],
                                       trees.prefix_lens[trees.masked], trees.masked_cu,
                                       trees.masked_bits, kv_cache.shape[2])
        attn_metadata.respsp_plan = (trees, plan)
    rows = trees.masked_rows
    q = query[rows].view(rows.numel(), impl.num_heads, impl.head_size)
    tree_out = plan.attend(q, kv_cache, layer.isa, impl.scale)
    output.view(output.shape[0], impl.num_heads, impl.head_size)[rows] = tree_out.to(output.dtype)


def compact_kv_caches(runner, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy KV from `src` to `dst` slots in every attention layer of the target."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise NotImplementedError("respsp KV compaction is implemented for vLLM's CPU cache layout only")
    context = runner.compilation_config.static_forward_context
    by_isa: dict[str, list[torch.Tensor]] = {}
    seen: set[int] = set()
    for layer in context.values():
        cache = getattr(layer, "kv_cache", None)
        isa = getattr(layer, "isa", None)
        if not isinstance(cache, torch.Tensor) or isa is None or cache.data_ptr() in seen:
            continue
        seen.add(cache.data_ptr())
        by_isa.setdefault(isa, []).append(cache)
    for isa, caches in by_isa.items():
        compact_kv_cpu(caches, isa, src, dst)
