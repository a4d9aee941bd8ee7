"""The seam between respsp's runtime and an attention layout.

The runtime knows trees (`StepTrees`: per request the tree's rows, parents, prefix length and
ancestor bitmask) and nothing of how vLLM lays out its paged KV cache. A `TreeAttentionBackend`
knows one vLLM attention backend (by its `get_name()`, e.g. "CPU_ATTN", "TRITON_ATTN"):

- `layout_error(layers)`: once per engine, after the caches exist: why this backend cannot read
  them (e.g. an ISA it does not know), or None. The runtime then drafts chains (counted).
- `attend(impl, layer, query, kv_cache, attn_metadata, output, trees)`: every layer, after vLLM's
  own attention ran: the rows of non-chain trees get attention through their ancestor masks.
  Whatever is the same for every layer (gather indices, masks) is planned once per step and kept
  on the step's attention metadata (`plan`).
- `compact(layers, src, dst)`: after verification, copy the accepted path's K/V from its tree
  slots to the contiguous slots vLLM's prefix rollback expects, in every layer.
- `write_rows(layer, slots, k, v)` / `read_blocks(layer, blocks)`: one layer's K/V rows written
  at cache slots as vLLM's own cache update writes them, and read back by whole blocks: the
  draft head's keys/values live in the cache of its attention layer (`runtime.head_kv`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from vllm_respsp.step_clock import timed
from vllm_respsp.tree.step_trees import StepTrees

PLAN_ATTR = "respsp_plan"


class TreeAttentionBackend:
    vllm_backend: ClassVar[str]  # AttentionBackend.get_name() of the vLLM backend it reads

    def layout_error(self, layers: list) -> str | None:
        return None

    def plan(self, trees: StepTrees, attn_metadata, kv_cache: torch.Tensor) -> Any:
        raise NotImplementedError

    def attend_rows(self, plan, impl, q: torch.Tensor, kv_cache: torch.Tensor, layer) -> torch.Tensor:
        """q [M, Hq, D] of the planned tree rows -> their attention outputs [M, Hq, D]."""
        raise NotImplementedError

    def compact(self, layers: list, src: torch.Tensor, dst: torch.Tensor) -> None:
        raise NotImplementedError

    def write_rows(self, layer, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [N, Hkv, D] into the layer's cache at `slots` (int64 [N])."""
        raise NotImplementedError

    def read_blocks(self, layer, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's K and V of whole cache blocks (int64 [R, B]): [R, B * block_size, Hkv, D]
        each, token-major, in the cache's dtype (one gather of the blocks, not one per slot)."""
        raise NotImplementedError

    def attend(self, impl, layer, query, kv_cache, attn_metadata, output, trees: StepTrees) -> None:
        """Overwrite the rows of the step's non-chain trees with tree-masked attention."""
        with timed("tree_attention"):
            cached = getattr(attn_metadata, PLAN_ATTR, None)
            if cached is not None and cached[0] is trees:
                plan = cached[1]
            else:  # once per step: every layer shares the block table and the masks
                plan = self.plan(trees, attn_metadata, kv_cache)
                setattr(attn_metadata, PLAN_ATTR, (trees, plan))
            rows = trees.masked_rows
            q = query[rows].view(rows.numel(), impl.num_heads, impl.head_size)
            out = self.attend_rows(plan, impl, q, kv_cache, layer)
            output.view(output.shape[0], impl.num_heads, impl.head_size)[rows] = out.to(output.dtype)


def unique_caches(layers: list) -> list:
    """The layers whose KV cache tensor is not shared with an earlier one (KV sharing)."""
    seen, out = set(), []
    for layer in layers:
        cache = getattr(layer, "kv_cache", None)
        if isinstance(cache, torch.Tensor) and cache.numel() and cache.data_ptr() not in seen:
            seen.add(cache.data_ptr())
            out.append(layer)
    return out
