"""Attention of draft-tree query nodes over a paged KV cache.

Batch layout and ancestor bitmasks: see :mod:`vllm_respsp_triton.tree_metadata`.

The tree's own K/V are already in the paged cache (vLLM's slot mapping writes
them before attention): local node j of request b sits at token position
``prefix_lens[b] + j``.  Query node i of request b sees every prefix position
``0 .. prefix_lens[b]-1`` and tree position ``prefix_lens[b] + j`` iff bit j of
its ancestor row is set (itself included).
"""

from __future__ import annotations

import math

import torch

from ._dispatch import INTERPRET, next_pow2, tl, triton, use_triton
from .tree_metadata import BITS_PER_WORD, unpack_ancestor_bits


def _paged_positions(block_table_row: torch.Tensor, length: int, block_size: int):
    """(block id, offset in block) of token positions 0..length-1."""
    pos = torch.arange(length, device=block_table_row.device)
    return block_table_row[pos // block_size].long(), pos % block_size


def tree_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    cu_nodes: torch.Tensor,
    ancestor_bits: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Reference for :func:`tree_attention`; same signature and output.

    One request at a time: gather its prefix + tree K/V into contiguous
    tensors, build the boolean visibility mask from the bitmask, and run a
    dense masked softmax in fp32.
    """
    num_tokens, num_q_heads, head_size = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    cu = cu_nodes.tolist()
    prefixes = prefix_lens.tolist()
    for b, prefix in enumerate(prefixes):
        start, end = cu[b], cu[b + 1]
        n = end - start
        blocks, offsets = _paged_positions(block_table[b], prefix + n, block_size)
        k = k_cache[blocks, offsets].float()  # [L, Hkv, D]
        v = v_cache[blocks, offsets].float()
        visible = torch.ones(n, prefix + n, dtype=torch.bool, device=q.device)
        visible[:, prefix:] = unpack_ancestor_bits(ancestor_bits[start:end], n)
        qb = q[start:end].float().view(n, num_kv_heads, group, head_size)
        scores = torch.einsum("nhgd,lhd->hgnl", qb, k) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        ob = torch.einsum("hgnl,lhd->nhgd", probs, v)
        out[start:end] = ob.reshape(n, num_q_heads, head_size).to(q.dtype)
    return out


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q,
    pos, key_ok, visible,  # [BLOCK_N] token positions, [BLOCK_N] in range, [BLOCK_M, BLOCK_N]
    k_cache_ptr, v_cache_ptr, block_table_row_ptr, kv_head, dim, dim_ok,
    stride_k_block, stride_k_slot, stride_k_head,
    stride_v_block, stride_v_slot, stride_v_head,
    scale_log2e,
    PAGE: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """One online-softmax step (base 2, fp32 statistics) over a key tile."""
    block_id = tl.load(block_table_row_ptr + pos // PAGE, mask=key_ok, other=0).to(tl.int64)
    in_page = pos % PAGE
    kv_ok = key_ok[:, None] & dim_ok[None, :]
    k_rows = block_id * stride_k_block + in_page * stride_k_slot + kv_head * stride_k_head
    k = tl.load(k_cache_ptr + k_rows[:, None] + dim[None, :], mask=kv_ok, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2e
    scores = tl.where(visible, scores, float("-inf"))
    # m_i starts finite, so a row with nothing visible yet keeps alpha == 1 and
    # p == 0 instead of producing (-inf) - (-inf) = nan.
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v_rows = block_id * stride_v_block + in_page * stride_v_slot + kv_head * stride_v_head
    v = tl.load(v_cache_ptr + v_rows[:, None] + dim[None, :], mask=kv_ok, other=0.0)
    p = p.to(v.dtype)  # round like the half-precision dot would
    if DOT_FP32:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _tree_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_table_ptr, prefix_lens_ptr, cu_nodes_ptr, ancestor_bits_ptr,
    scale_log2e,
    stride_q_node, stride_q_head,
    stride_o_node, stride_o_head,
    stride_k_block, stride_k_slot, stride_k_head,
    stride_v_block, stride_v_slot, stride_v_head,
    stride_bt_req,
    n_words,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_P2: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # tree nodes per program; rows = BLOCK_Q * GROUP_P2
    BLOCK_N: tl.constexpr,  # prefix keys per tile
    HEAD: tl.constexpr,
    HEAD_P2: tl.constexpr,
    PAGE: tl.constexpr,  # paged-cache block size
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no tf32), else "tf32" (unused)
    DOT_FP32: tl.constexpr,  # upcast dot operands: the interpreter's bf16 tl.dot is wrong
):
    # One program per (request, KV head, block of query nodes).  Its rows are
    # every query head of the KV head's group for each node, so each K/V tile
    # is loaded once for the whole group (GQA).
    request = tl.program_id(0)
    kv_head = tl.program_id(1)
    node_block = tl.program_id(2)
    start = tl.load(cu_nodes_ptr + request)
    n_nodes = tl.load(cu_nodes_ptr + request + 1) - start
    if node_block * BLOCK_Q >= n_nodes:
        return
    prefix = tl.load(prefix_lens_ptr + request)
    block_table_row_ptr = block_table_ptr + request.to(tl.int64) * stride_bt_req

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P2
    r = tl.arange(0, BLOCK_M)
    node = node_block * BLOCK_Q + r // GROUP_P2
    q_head = kv_head * GROUP + r % GROUP_P2
    row_ok = (node < n_nodes) & (r % GROUP_P2 < GROUP)
    row = (start + node).to(tl.int64)
    dim = tl.arange(0, HEAD_P2)
    dim_ok = dim < HEAD
    q = tl.load(
        q_ptr + row[:, None] * stride_q_node + q_head[:, None] * stride_q_head + dim[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_P2], dtype=tl.float32)

    # Prefix: every row sees every cached token; only the last tile is ragged.
    for tile_start in range(0, prefix, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)
        key_ok = pos < prefix
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, pos, key_ok, key_ok[None, :],
            k_cache_ptr, v_cache_ptr, block_table_row_ptr, kv_head, dim, dim_ok,
            stride_k_block, stride_k_slot, stride_k_head,
            stride_v_block, stride_v_slot, stride_v_head,
            scale_log2e, PAGE, PRECISION, DOT_FP32,
        )

    # Tree: tiles of 32 keys line up with one bitmask word, so each row needs a
    # single word per tile.  Keys past this block's last node are never
    # ancestors (parents[i] < i), so the scan stops there.
    last_node = tl.minimum(n_nodes, (node_block + 1) * BLOCK_Q)
    bit = tl.arange(0, 32)
    for word in range(0, tl.cdiv(last_node, 32)):
        j = word * 32 + bit
        key_ok = j < n_nodes
        ancestors = tl.load(ancestor_bits_ptr + row * n_words + word, mask=row_ok, other=0)
        visible = ((ancestors[:, None] >> bit[None, :]) & 1) != 0
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, prefix + j, key_ok, visible & key_ok[None, :],
            k_cache_ptr, v_cache_ptr, block_table_row_ptr, kv_head, dim, dim_ok,
            stride_k_block, stride_k_slot, stride_k_head,
            stride_v_block, stride_v_slot, stride_v_head,
            scale_log2e, PAGE, PRECISION, DOT_FP32,
        )

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + row[:, None] * stride_o_node + q_head[:, None] * stride_o_head + dim[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )


def _pick_block_q(num_requests: int, num_kv_heads: int, max_nodes: int, group_p2: int) -> int:
    """Nodes per program: big tiles when the grid is large, small when not.

    Few programs (small batch) leave SMs idle; shrinking the node block adds
    programs at the price of re-reading the prefix K/V (mostly from L2).
    """
    block_q = max(1, 128 // group_p2)
    min_block_q = max(1, 16 // group_p2)  # tl.dot needs >= 16 rows
    while block_q > min_block_q:
        programs = num_requests * num_kv_heads * triton.cdiv(max_nodes, block_q)
        if programs >= 256:
            break
        block_q //= 2
    return block_q


def _tree_attention_triton(
    q, k_cache, v_cache, block_table, prefix_lens, cu_nodes, ancestor_bits, scale,
    block_q: int | None = None,  # nodes per program; None picks by grid size
) -> torch.Tensor:
    num_tokens, num_q_heads, head_size = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert num_q_heads % num_kv_heads == 0, "GQA needs num_q_heads % num_kv_heads == 0"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    group = num_q_heads // num_kv_heads
    group_p2 = next_pow2(group)
    n_words = ancestor_bits.shape[1]
    ancestor_bits = ancestor_bits.contiguous()
    block_table = block_table.contiguous()
    prefix_lens = prefix_lens.contiguous()
    cu_nodes = cu_nodes.contiguous()
    out = torch.empty_like(q)
    num_requests = cu_nodes.numel() - 1
    if num_tokens == 0 or num_requests == 0:
        return out
    # n_words * 32 bounds every tree's size without reading cu_nodes on the host.
    max_nodes = n_words * BITS_PER_WORD
    if block_q is None:
        block_q = _pick_block_q(num_requests, num_kv_heads, max_nodes, group_p2)
    block_m = block_q * group_p2
    # Triton 3.9's interpreter computes bf16 tl.dot wrongly; there the operands
    # are upcast after the same bf16 rounding, so results still match the GPU's.
    dot_fp32 = INTERPRET and q.dtype == torch.bfloat16 and not q.is_cuda
    grid = (num_requests, num_kv_heads, triton.cdiv(max_nodes, block_q))
    _tree_attention_kernel[grid](
        q, k_cache, v_cache, out,
        block_table, prefix_lens, cu_nodes, ancestor_bits,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0),
        n_words,
        GROUP=group,
        GROUP_P2=group_p2,
        BLOCK_Q=block_q,
        BLOCK_N=64 if head_size <= 64 or block_m <= 64 else 32,
        HEAD=head_size,
        HEAD_P2=next_pow2(head_size),
        PAGE=block_size,
        PRECISION="ieee" if q.dtype == torch.float32 or dot_fp32 else "tf32",
        DOT_FP32=dot_fp32,
        num_warps=8 if block_m >= 128 else 4,
    )
    return out


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    cu_nodes: torch.Tensor,
    ancestor_bits: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Tree-masked attention of draft-tree queries over a paged KV cache.

    Args:
        q: [total_nodes, num_q_heads, head_size], fp16/bf16/fp32.
        k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_size]
            (vLLM flash-attention layout, one layer; the last dim contiguous).
            ``num_q_heads`` must be a multiple of ``num_kv_heads``.
        block_table: int32 [B, max_blocks_per_req].
        prefix_lens: int32 [B], tokens in the cache before the tree.
        cu_nodes: int32 [B+1] (see :mod:`vllm_respsp_triton.tree_metadata`).
        ancestor_bits: int32 [total_nodes, n_words] from
            :func:`build_tree_metadata`.
        scale: softmax scale (usually head_size ** -0.5).
    Returns:
        [total_nodes, num_q_heads, head_size] in ``q.dtype``.
    The tree's K/V must already be in the cache at positions
    ``prefix_lens[b] + local_index``.  Softmax statistics are fp32.
    """
    if use_triton(q):
        return _tree_attention_triton(
            q, k_cache, v_cache, block_table, prefix_lens, cu_nodes, ancestor_bits, scale
        )
    return tree_attention_ref(
        q, k_cache, v_cache, block_table, prefix_lens, cu_nodes, ancestor_bits, scale
    )
