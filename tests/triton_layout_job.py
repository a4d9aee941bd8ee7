"""TRITON_ATTN's KV layout as vLLM writes it, read through respsp's Triton backend views.

Run by tests/test_triton_backend.py in a process with the test engine hooks (vLLM's Triton kernels
real, interpreted). Prints "layout ok" when every check passes.
"""

from types import SimpleNamespace

import torch
from vllm.v1.attention.ops.triton_reshape_and_cache_flash import triton_reshape_and_cache_flash
from vllm.v1.kv_cache_layout import KVCacheLayout

from vllm_respsp.backends.triton import FlashTreeBackend, TritonTreeBackend, kv_planes, kv_views
from vllm_respsp_triton import build_tree_metadata, compact_kv, tree_attention, tree_attention_ref

BLOCKS, HEADS, BLOCK, HS = 6, 2, 16, 32


def vllm_layer_cache() -> tuple[torch.Tensor, torch.Tensor]:
    """(raw storage, logical [B, H, N, 2*HS] view) with the stride permutation vLLM's default
    layout for TRITON_ATTN (LBNHC) gives one layer."""
    logical = (BLOCKS, HEADS, BLOCK, 2 * HS)
    perm = KVCacheLayout.LBNHC.value[1:]  # the layer's own axes B, H, N, C
    order = [p - 1 for p in perm]  # physical order of the logical axes
    physical = [logical[a] for a in order]
    raw = torch.zeros(physical)
    strides = [0] * 4
    step = 1
    for axis in reversed(order):
        strides[axis] = step
        step *= logical[axis]
    return raw, torch.as_strided(raw, logical, strides)


def main() -> None:
    torch.manual_seed(0)
    raw, cache = vllm_layer_cache()
    assert tuple(raw.shape) == (BLOCKS, BLOCK, HEADS, 2 * HS)  # memory [B, N, H, K|V]
    slots = torch.randperm(BLOCKS * BLOCK)[:40]
    key, value = torch.randn(40, HEADS, HS), torch.randn(40, HEADS, HS)
    k_cache, v_cache = cache.transpose(1, 2).split(HS, -1)  # TritonAttentionImpl.do_kv_cache_update
    one = torch.ones(())
    triton_reshape_and_cache_flash(key, value, k_cache, v_cache, slots, "auto", one, one)
    b, o = slots // BLOCK, slots % BLOCK
    assert torch.equal(raw[b, o, :, :HS], key) and torch.equal(raw[b, o, :, HS:], value)  # raw bytes
    k, v = kv_views(cache, HS)
    assert k.data_ptr() == raw.data_ptr() and torch.equal(k[b, o], key) and torch.equal(v[b, o], value)
    planes = kv_planes(cache)
    assert torch.equal(planes[0, b, o], key) and torch.equal(planes[1, b, o], value)

    # the draft head's rows (runtime.head_kv): read what vLLM wrote; written where vLLM writes
    backend, layer = TritonTreeBackend(), SimpleNamespace(kv_cache=cache)
    got_k, got_v = backend.read_blocks(layer, torch.arange(BLOCKS)[None])  # every block, as one request
    assert torch.equal(got_k[0, slots], key) and torch.equal(got_v[0, slots], value)
    saved = raw.clone()
    new_k, new_v = torch.randn(40, HEADS, HS), torch.randn(40, HEADS, HS)
    backend.write_rows(layer, slots, new_k, new_v)
    written = raw.clone()
    raw.copy_(saved)
    triton_reshape_and_cache_flash(new_k, new_v, k_cache, v_cache, slots, "auto", one, one)
    assert torch.equal(written, raw)

    # FLASH_ATTN writes its cache through the same views (its CUDA-only reshape_and_cache_flash is
    # stood in for by the Triton one, which takes the same arguments)
    from vllm.v1.attention.backends import flash_attn

    flash_attn.reshape_and_cache_flash = triton_reshape_and_cache_flash
    impl = SimpleNamespace(attn_type="decoder", head_size=HS, kv_cache_dtype="auto")
    raw.zero_()
    flash_attn.FlashAttentionImpl.do_kv_cache_update(impl, SimpleNamespace(_k_scale=one, _v_scale=one),
                                                     key, value, cache, slots)
    got_k, got_v = FlashTreeBackend().read_blocks(layer, torch.arange(BLOCKS)[None])
    assert torch.equal(got_k[0, slots], key) and torch.equal(got_v[0, slots], value)

    # tree attention through the views: two requests, prefixes 21 / 5, trees of 6 / 3 nodes
    block_table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    prefix = torch.tensor([21, 5], dtype=torch.int32)
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, -1, 0, 0], dtype=torch.int32)
    cu = torch.tensor([0, 6, 9], dtype=torch.int32)
    bits = build_tree_metadata(parents, cu, 6).ancestor_bits
    q = torch.randn(9, 2 * HEADS, HS)
    got = tree_attention(q, k, v, block_table, prefix, cu, bits, HS ** -0.5)
    want = tree_attention_ref(q, k.contiguous(), v.contiguous(), block_table, prefix, cu, bits, HS ** -0.5)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()

    # compaction through the planes moves exactly the asked slots, in K and V
    before = raw.clone()
    src, dst = torch.tensor([[17, 40, -1]]), torch.tensor([[3, 41, 7]])
    compact_kv([planes], src, dst)
    for s_, d_ in ((17, 3), (40, 41)):
        assert torch.equal(raw[d_ // BLOCK, d_ % BLOCK], before[s_ // BLOCK, s_ % BLOCK])
    untouched = torch.ones(BLOCKS * BLOCK, dtype=torch.bool)
    untouched[[3, 41]] = False
    assert torch.equal(raw.view(-1, HEADS, 2 * HS)[untouched], before.view(-1, HEADS, 2 * HS)[untouched])
    print("layout ok")


if __name__ == "__main__":
    main()
