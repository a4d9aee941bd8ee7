"""Move the accepted path's K/V from tree slots to contiguous slots.

After verification, the accepted nodes (local indices ``accepted_nodes[b]``,
root first) must end up at positions ``prefix_lens[b] + d`` for path index d,
but were written at ``prefix_lens[b] + node``.  :func:`compaction_slots` turns
that into flat slot ids, :func:`compact_kv` copies every layer in one launch.

Slot layout: ``src_slots`` / ``dst_slots`` int64 [B, max_copies], flat paged
slot ids (``block_id * block_size + offset``), row b holds request b's copies,
padded with -1 (a pair with a negative slot is skipped).

Hazard: within a request a destination may be another copy's source (path
[0, 2, 3]: dst 2 <- src 3 while dst 1 <- src 2).  Both implementations read
ALL of a request's sources before writing any destination ("gather, then
scatter").  Different requests own different cache blocks, so they never
interact.

KV cache addressing: ``kv_caches`` is either a sequence of per-layer tensors,
each [P, num_blocks, block_size, num_kv_heads, head_size] (vLLM's
flash-attention layout has P == 2: K and V), or one stacked tensor
[L, P, num_blocks, block_size, num_kv_heads, head_size].  The kernel reaches
every layer in one launch through a device table of per-layer base addresses,
so the layers may live in separate allocations; they must share shape, dtype,
strides and device.  Layers that do not are copied one launch per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._dispatch import next_pow2, tl, triton, use_triton

KVCaches = torch.Tensor | Sequence[torch.Tensor]


def compaction_slots(
    prefix_lens: torch.Tensor,
    accepted_nodes: torch.Tensor,
    accepted_len: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(src_slots, dst_slots) int64 [B, max_depth] for :func:`compact_kv`.

    Path index d >= 1 copies position ``prefix + accepted_nodes[b, d]`` to
    ``prefix + d``.  The root (d == 0) never moves, and copies whose node
    already sits at its path index are dropped (set to -1).  Plain vectorised
    torch: runs on any device without a host sync.
    """
    path_index = torch.arange(1, accepted_nodes.shape[1], device=accepted_nodes.device)
    node = accepted_nodes[:, 1:].long()
    needed = (path_index[None, :] <= accepted_len[:, None].long()) & (node != path_index[None, :])
    prefix = prefix_lens[:, None].long()
    src_pos = torch.where(needed, prefix + node, 0)
    dst_pos = torch.where(needed, prefix + path_index[None, :], 0)
    table = block_table.long()

    def slot_of(pos: torch.Tensor) -> torch.Tensor:
        return table.gather(1, pos // block_size) * block_size + pos % block_size

    src_slots = torch.where(needed, slot_of(src_pos), -1)
    dst_slots = torch.where(needed, slot_of(dst_pos), -1)
    return src_slots, dst_slots


def _layers(kv_caches: KVCaches) -> list[torch.Tensor]:
    return list(kv_caches.unbind(0)) if isinstance(kv_caches, torch.Tensor) else list(kv_caches)


def compact_kv_ref(
    kv_caches: KVCaches, src_slots: torch.Tensor, dst_slots: torch.Tensor
) -> None:
    """Reference for :func:`compact_kv`; same signature, copies in place."""
    valid = (src_slots >= 0) & (dst_slots >= 0)
    src, dst = src_slots[valid], dst_slots[valid]
    for cache in _layers(kv_caches):
        block_size = cache.shape[2]
        # Gather everything first: a destination may also be a source.
        rows = cache[:, src // block_size, src % block_size].clone()
        cache[:, dst // block_size, dst % block_size] = rows


@triton.jit
def _compact_kv_kernel(
    layer_base_ptr,  # int64 [L]: address of each layer's cache
    any_layer_ptr,  # one layer's cache: only its element type is used
    src_slots_ptr,
    dst_slots_ptr,
    max_copies,
    stride_slots_req,
    stride_plane,
    stride_block,
    stride_offset,
    stride_head,
    stride_dim,
    NUM_PLANES: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    ROW_SIZE: tl.constexpr,  # num_kv_heads * head_size
    PAGE: tl.constexpr,
    COPIES_P2: tl.constexpr,
    BLOCK_ROW: tl.constexpr,
):
    # One program per (request, layer x plane, slice of the heads*dims row):
    # it holds the request's whole path for its slice in registers.
    request = tl.program_id(0)
    layer = tl.program_id(1) // NUM_PLANES
    plane = tl.program_id(1) % NUM_PLANES
    copy = tl.arange(0, COPIES_P2)
    copy_ok = copy < max_copies
    slot_row = request.to(tl.int64) * stride_slots_req + copy
    src = tl.load(src_slots_ptr + slot_row, mask=copy_ok, other=-1)
    dst = tl.load(dst_slots_ptr + slot_row, mask=copy_ok, other=-1)
    pair_ok = (src >= 0) & (dst >= 0)
    if tl.max(pair_ok.to(tl.int32), axis=0) == 0:
        return

    elem = tl.program_id(2) * BLOCK_ROW + tl.arange(0, BLOCK_ROW)
    elem_ok = elem < ROW_SIZE
    elem_off = (elem // HEAD_SIZE) * stride_head + (elem % HEAD_SIZE) * stride_dim
    base = tl.load(layer_base_ptr + layer).to(tl.pointer_type(any_layer_ptr.dtype.element_ty))
    base += plane * stride_plane
    src_off = (src // PAGE) * stride_block + (src % PAGE) * stride_offset
    dst_off = (dst // PAGE) * stride_block + (dst % PAGE) * stride_offset
    mask = pair_ok[:, None] & elem_ok[None, :]
    rows = tl.load(base + src_off[:, None] + elem_off[None, :], mask=mask)
    # Every thread must finish reading before any writes: a destination may be
    # a source read by another thread of this program.
    tl.debug_barrier()
    tl.store(base + dst_off[:, None] + elem_off[None, :], rows, mask=mask)


_BASE_TABLES: dict[tuple, torch.Tensor] = {}


def _layer_base_table(layers: list[torch.Tensor]) -> torch.Tensor:
    """Device int64 tensor of layer addresses, cached: caches never move, and
    rebuilding it every step would cost a host-to-device copy."""
    key = (layers[0].device, tuple(t.data_ptr() for t in layers))
    table = _BASE_TABLES.get(key)
    if table is None:
        if len(_BASE_TABLES) > 64:
            _BASE_TABLES.clear()
        table = torch.tensor(key[1], dtype=torch.int64, device=layers[0].device)
        _BASE_TABLES[key] = table
    return table


def _compact_kv_triton(layers: list[torch.Tensor], src_slots, dst_slots) -> None:
    first = layers[0]
    num_planes, _, block_size, num_heads, head_size = first.shape
    num_requests, max_copies = src_slots.shape
    if num_requests == 0 or max_copies == 0:
        return
    src_slots = src_slots.to(torch.int64).contiguous()
    dst_slots = dst_slots.to(torch.int64).contiguous()
    row_size = num_heads * head_size
    copies_p2 = next_pow2(max_copies)
    block_row = min(next_pow2(row_size), max(128, 8192 // copies_p2))
    grid = (num_requests, len(layers) * num_planes, triton.cdiv(row_size, block_row))
    _compact_kv_kernel[grid](
        _layer_base_table(layers),
        first,
        src_slots,
        dst_slots,
        max_copies,
        src_slots.stride(0),
        first.stride(0),
        first.stride(1),
        first.stride(2),
        first.stride(3),
        first.stride(4),
        NUM_PLANES=num_planes,
        HEAD_SIZE=head_size,
        ROW_SIZE=row_size,
        PAGE=block_size,
        COPIES_P2=copies_p2,
        BLOCK_ROW=block_row,
    )


def _same_layout(layers: list[torch.Tensor]) -> bool:
    first = layers[0]
    return all(
        t.shape == first.shape
        and t.stride() == first.stride()
        and t.dtype == first.dtype
        and t.device == first.device
        for t in layers
    )


def compact_kv(kv_caches: KVCaches, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """Copy K/V rows ``src_slots -> dst_slots`` in every layer, in place.

    Args:
        kv_caches: per-layer [P, num_blocks, block_size, H, D] tensors or one
            stacked [L, P, num_blocks, block_size, H, D] tensor (module doc).
        src_slots, dst_slots: int64 [B, max_copies], flat slot ids, -1 padded,
            e.g. from :func:`compaction_slots`.
    All of a request's sources are read before any destination is written.
    One launch for all layers when they share a layout, else one per layer.
    """
    layers = _layers(kv_caches)
    if not layers:
        return
    if not use_triton(layers[0]):
        compact_kv_ref(layers, src_slots, dst_slots)
        return
    groups = [layers] if _same_layout(layers) else [[t] for t in layers]
    for group in groups:
        _compact_kv_triton(group, src_slots, dst_slots)
