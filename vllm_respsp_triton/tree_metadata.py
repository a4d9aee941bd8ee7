"""Per-step draft-tree metadata: ancestor bitmasks, depths, child/sibling links.

Batch layout (shared by every module of this package)
-----------------------------------------------------
A batch of B requests, each with a draft tree of n_b >= 1 nodes, is stored
flattened and ragged:

* ``cu_nodes``  int32 [B+1], cumulative node counts, ``cu_nodes[0] == 0``;
  request b owns global rows ``cu_nodes[b] : cu_nodes[b+1]``.
* ``parents``   int32 [total_nodes], LOCAL parent index (0..n_b-1), -1 for
  the root.  Node 0 of every request is the root (the last accepted token);
  nodes are topologically ordered, ``parents[i] < i``.  Breadth-first order
  satisfies this; nothing here needs more than ``parents[i] < i``.

``n_b == 1`` (root only) is a request without a draft.  Trees are tested up to
``MAX_TREE_NODES`` nodes (128 draft nodes + root), depth up to 128 (a chain)
and fan-out up to 128; nothing in the kernels hard-codes these limits.

Ancestor bitmask packing
------------------------
``ancestor_bits[i, w]`` holds bits for local nodes ``32*w .. 32*w+31``; bit
``j % 32`` of word ``j // 32`` is set iff local node j is node i or one of its
ancestors.  Words are int32 carrying the unsigned 32-bit pattern: node
``32*w + 31`` is the sign bit, so a word with it set is negative.  Read bits
with ``(word >> (j % 32)) & 1``; the arithmetic shift is harmless because of
the ``& 1``.  Never compare words with ``> 0``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._dispatch import next_pow2, tl, triton, use_triton

MAX_TREE_NODES = 129  # 128 draft nodes + the root: the tested maximum
BITS_PER_WORD = 32


class TreeMetadata(NamedTuple):
    """All per-node tensors are indexed by global node row, values are LOCAL."""

    ancestor_bits: torch.Tensor  # int32 [total_nodes, n_words], see module doc
    depths: torch.Tensor  # int32 [total_nodes]; root 0 (the RoPE offset)
    first_child: torch.Tensor  # int32 [total_nodes]; lowest-index child, -1 if leaf
    next_sibling: torch.Tensor  # int32 [total_nodes]; next-higher sibling, -1 if none


def num_words(max_nodes: int) -> int:
    """32-bit words per ancestor row for trees of up to ``max_nodes`` nodes."""
    return max(1, -(-int(max_nodes) // BITS_PER_WORD))


def unpack_ancestor_bits(ancestor_bits: torch.Tensor, n: int) -> torch.Tensor:
    """bool [rows, n]: entry [r, j] is bit j of ``ancestor_bits[r]``."""
    j = torch.arange(n, device=ancestor_bits.device)
    words = ancestor_bits[:, j // BITS_PER_WORD]
    return ((words >> (j % BITS_PER_WORD).to(words.dtype)) & 1).bool()


def node_requests(cu_nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(request id, global row of the request's root) of every node row."""
    cu = cu_nodes.long()
    counts = cu[1:] - cu[:-1]
    request = torch.repeat_interleave(torch.arange(counts.numel(), device=cu.device), counts)
    return request, cu[:-1][request]


# ----------------------------------------------------------------------------
# PyTorch reference (CPU production path and test oracle)
# ----------------------------------------------------------------------------


def build_tree_metadata_ref(
    parents: torch.Tensor, cu_nodes: torch.Tensor, max_nodes: int
) -> TreeMetadata:
    """Reference for :func:`build_tree_metadata`; same signature and outputs."""
    device = parents.device
    total = parents.numel()
    n_words = num_words(max_nodes)
    _, root_row = node_requests(cu_nodes)
    local = torch.arange(total, device=device) - root_row
    parent_local = parents.long()
    if total:
        counts = cu_nodes[1:].long() - cu_nodes[:-1].long()
        assert int(counts.min()) >= 1, "every request needs at least its root"
        assert int(counts.max()) <= max_nodes, "a tree is larger than max_nodes"
        is_root = local == 0
        assert bool((parent_local[is_root] == -1).all()), "node 0 must be the root"
        ok = (parent_local[~is_root] >= 0) & (parent_local[~is_root] < local[~is_root])
        assert bool(ok.all()), "parents[i] must lie in [0, i) for non-root nodes"
    parent_row = torch.where(parent_local >= 0, parent_local + root_row, -1)

    # Walk every node to the root in lockstep; each step adds one ancestor's
    # bit.  The ancestors of a row are distinct, so adding bits == OR-ing them.
    bits = torch.zeros(total, n_words, dtype=torch.int64, device=device)
    depths = torch.full((total,), -1, dtype=torch.int64, device=device)
    rows = torch.arange(total, device=device)
    cur = rows.clone()
    while bool((cur >= 0).any()):
        alive = cur >= 0
        row, anc = rows[alive], cur[alive]
        anc_local = local[anc]
        bits.index_put_(
            (row, anc_local // BITS_PER_WORD),
            torch.ones_like(anc_local) << (anc_local % BITS_PER_WORD),
            accumulate=True,
        )
        depths[row] += 1
        cur[alive] = parent_row[anc]
    # Reinterpret the unsigned 32-bit patterns as int32 (bit 31 -> sign).
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)

    # first_child: the lowest-index node whose parent is this node.
    no_child = total + 1
    child_rows = rows[parent_row >= 0]
    first_child = torch.full((total,), no_child, dtype=torch.int64, device=device)
    first_child.scatter_reduce_(0, parent_row[child_rows], child_rows, reduce="amin")
    first_child = torch.where(first_child == no_child, -1, first_child - root_row)

    # next_sibling: sort children by (parent, index); neighbours that share a
    # parent are consecutive siblings.
    order = torch.sort(parent_row[child_rows], stable=True).indices
    sorted_rows = child_rows[order]
    same_parent = parent_row[sorted_rows[1:]] == parent_row[sorted_rows[:-1]]
    next_sibling = torch.full((total,), -1, dtype=torch.int64, device=device)
    next_sibling[sorted_rows[:-1][same_parent]] = local[sorted_rows[1:][same_parent]]

    return TreeMetadata(
        bits, depths.to(torch.int32), first_child.to(torch.int32), next_sibling.to(torch.int32)
    )


# ----------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------


@triton.jit
def _tree_metadata_kernel(
    parents_ptr,
    cu_nodes_ptr,
    ancestor_bits_ptr,
    depths_ptr,
    first_child_ptr,
    next_sibling_ptr,
    n_words,
    BLOCK_I: tl.constexpr,  # nodes described by one program
    BLOCK_J: tl.constexpr,  # candidate children scanned per step
    WORDS_P2: tl.constexpr,  # n_words rounded up to a power of two
):
    request = tl.program_id(0)
    node_block = tl.program_id(1)
    start = tl.load(cu_nodes_ptr + request)
    n_nodes = tl.load(cu_nodes_ptr + request + 1) - start
    if node_block * BLOCK_I >= n_nodes:
        return
    node = node_block * BLOCK_I + tl.arange(0, BLOCK_I)
    node_ok = node < n_nodes
    parent = tl.load(parents_ptr + start + node, mask=node_ok, other=-1)

    # Ancestors: every node of the block climbs one level per iteration, so the
    # loop runs (depth of the deepest node + 1) times.  The step bound guards
    # against a malformed tree (parents[i] >= i) hanging the GPU.
    word_id = tl.arange(0, WORDS_P2)
    bits = tl.zeros([BLOCK_I, WORDS_P2], dtype=tl.uint32)
    depth = tl.full([BLOCK_I], -1, dtype=tl.int32)
    cur = tl.where(node_ok, node, -1)
    steps = 0
    climbing = tl.max(cur, axis=0) >= 0
    while climbing:
        alive = cur >= 0
        safe = tl.where(alive, cur, 0)  # keep shifts/offsets in range for dead lanes
        bit = tl.full([BLOCK_I], 1, dtype=tl.uint32) << (safe % 32).to(tl.uint32)
        hit = alive[:, None] & ((safe // 32)[:, None] == word_id[None, :])
        bits = bits | tl.where(hit, bit[:, None], 0)
        depth += alive.to(tl.int32)
        cur = tl.load(parents_ptr + start + safe, mask=alive, other=-1)
        steps += 1
        climbing = (tl.max(cur, axis=0) >= 0) & (steps < n_nodes)

    # Children and next siblings always have a higher index than the node, so
    # the scan starts at this block's first node.
    big = n_nodes + 1
    first_child = tl.full([BLOCK_I], 0, dtype=tl.int32) + big
    next_sibling = tl.full([BLOCK_I], 0, dtype=tl.int32) + big
    for j_start in range(node_block * BLOCK_I, n_nodes, BLOCK_J):
        cand = j_start + tl.arange(0, BLOCK_J)
        cand_parent = tl.load(parents_ptr + start + cand, mask=cand < n_nodes, other=-2)
        is_child = cand_parent[None, :] == node[:, None]
        first_child = tl.minimum(
            first_child, tl.min(tl.where(is_child, cand[None, :], big), axis=1)
        )
        is_later_sibling = (
            (cand_parent[None, :] == parent[:, None])
            & (parent[:, None] >= 0)
            & (cand[None, :] > node[:, None])
        )
        next_sibling = tl.minimum(
            next_sibling, tl.min(tl.where(is_later_sibling, cand[None, :], big), axis=1)
        )

    row = (start + node).to(tl.int64)
    tl.store(depths_ptr + row, depth, mask=node_ok)
    tl.store(first_child_ptr + row, tl.where(first_child == big, -1, first_child), mask=node_ok)
    tl.store(next_sibling_ptr + row, tl.where(next_sibling == big, -1, next_sibling), mask=node_ok)
    word_ok = node_ok[:, None] & (word_id[None, :] < n_words)
    tl.store(
        ancestor_bits_ptr + row[:, None] * n_words + word_id[None, :],
        bits.to(tl.int32, bitcast=True),
        mask=word_ok,
    )


def _build_tree_metadata_triton(
    parents: torch.Tensor, cu_nodes: torch.Tensor, max_nodes: int
) -> TreeMetadata:
    total = parents.numel()
    n_words = num_words(max_nodes)
    device = parents.device
    bits = torch.empty(total, n_words, dtype=torch.int32, device=device)
    depths = torch.empty(total, dtype=torch.int32, device=device)
    first_child = torch.empty(total, dtype=torch.int32, device=device)
    next_sibling = torch.empty(total, dtype=torch.int32, device=device)
    num_requests = cu_nodes.numel() - 1
    block_i = 32
    if total and num_requests:
        grid = (num_requests, triton.cdiv(max_nodes, block_i))
        _tree_metadata_kernel[grid](
            parents.to(torch.int32).contiguous(),
            cu_nodes.to(torch.int32).contiguous(),
            bits,
            depths,
            first_child,
            next_sibling,
            n_words,
            BLOCK_I=block_i,
            BLOCK_J=32,
            WORDS_P2=next_pow2(n_words),
        )
    return TreeMetadata(bits, depths, first_child, next_sibling)


def build_tree_metadata(
    parents: torch.Tensor, cu_nodes: torch.Tensor, max_nodes: int
) -> TreeMetadata:
    """Ancestor bitmasks, depths and child/sibling links of a batch of trees.

    Args:
        parents: int32 [total_nodes], local parent index, -1 for each root.
        cu_nodes: int32 [B+1], cumulative node counts (see module doc).
        max_nodes: upper bound on any request's node count (root included);
            fixes ``n_words = ceil(max_nodes / 32)``.  Not checked on the GPU
            path (it would need a device sync): larger trees lose their high
            bits.
    Returns:
        :class:`TreeMetadata`: ``ancestor_bits`` int32 [total_nodes, n_words]
        (packing in the module doc), ``depths``, ``first_child`` and
        ``next_sibling`` int32 [total_nodes], all LOCAL indices / -1.
    One kernel launch for the whole batch (one program per request and block
    of 32 nodes).
    """
    if use_triton(parents):
        return _build_tree_metadata_triton(parents, cu_nodes, max_nodes)
    return build_tree_metadata_ref(parents, cu_nodes, max_nodes)
