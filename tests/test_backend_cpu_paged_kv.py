"""Our views of vLLM's CPU KV cache against vLLM's own CPU cache-write and attention ops."""

from types import SimpleNamespace

import pytest
import torch

from vllm_respsp.backends.cpu import CpuTreeBackend
from vllm_respsp.backends.cpu_paged_kv import compact_kv_cpu, kv_views, tree_attention_cpu
from vllm_respsp_triton import build_tree_metadata, compaction_slots

ops = pytest.importorskip("vllm._custom_ops")
pytest.importorskip("vllm._C")

# AMX is vLLM's layout for bf16 with block sizes that are multiples of 32 on CPUs with AMX tiles;
# its cache-write and attention ops need those CPUs.
AMX = pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="this CPU has no AMX tiles")
CASES = [("vec", 32, torch.float32), ("vec16", 16, torch.float32), ("vec16", 16, torch.bfloat16),
         pytest.param("amx", 32, torch.bfloat16, marks=AMX), pytest.param("amx", 128, torch.bfloat16, marks=AMX)]
H, D, NUM_BLOCKS = 2, 64, 12


def written_cache(isa, block_size, dtype, slots, gen):
    cache = torch.zeros(NUM_BLOCKS, H, block_size, 2 * D, dtype=dtype)
    key_cache, value_cache = cache.view(NUM_BLOCKS, H, block_size * 2, D).chunk(2, dim=2)
    k = torch.randn(slots.numel(), H, D, generator=gen).to(dtype)
    v = torch.randn(slots.numel(), H, D, generator=gen).to(dtype)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
    return cache, key_cache, value_cache, k, v


@pytest.mark.parametrize("isa,block_size,dtype", CASES)
def test_views_read_what_vllm_wrote(isa, block_size, dtype):
    gen = torch.Generator().manual_seed(0)
    slots = torch.randperm(NUM_BLOCKS * block_size, generator=gen)[:50]
    cache, _, _, k, v = written_cache(isa, block_size, dtype, slots, gen)
    kv, vv = kv_views(cache, isa)
    assert torch.equal(kv[slots // block_size, slots % block_size], k)
    assert torch.equal(vv[slots // block_size, slots % block_size], v)


@pytest.mark.parametrize("isa,block_size,dtype", CASES)
def test_head_rows_are_read_and_written_as_vllm_writes_them(isa, block_size, dtype):
    """The draft head's keys/values live in its layer's cache (runtime.head_kv): the backend
    reads what vLLM's cache write put there, and writes exactly what it would."""
    gen = torch.Generator().manual_seed(1)
    slots = torch.randperm(NUM_BLOCKS * block_size, generator=gen)[:50]
    cache, key_cache, value_cache, k, v = written_cache(isa, block_size, dtype, slots, gen)
    backend, layer = CpuTreeBackend(), SimpleNamespace(kv_cache=cache, isa=isa)
    got_k, got_v = backend.read_blocks(layer, torch.arange(NUM_BLOCKS)[None])  # every block, as one request
    assert torch.equal(got_k[0, slots], k) and torch.equal(got_v[0, slots], v)
    new_k, new_v = (torch.randn(slots.numel(), H, D, generator=gen).to(dtype) for _ in "kv")
    ours = cache.clone()
    backend.write_rows(SimpleNamespace(kv_cache=ours, isa=isa), slots, new_k, new_v)
    ops.cpu_attn_reshape_and_cache(new_k, new_v, key_cache, value_cache, slots, isa)
    assert torch.equal(ours, cache)


@pytest.mark.parametrize("isa,block_size,dtype", CASES[:2] + CASES[3:])
def test_chain_tree_attention_equals_vllm_causal_attention(isa, block_size, dtype):
    """A chain's ancestor mask is causal: our path must reproduce vLLM's CPU attention."""
    gen = torch.Generator().manual_seed(1)
    prefix, n = 37, 6
    block_table = torch.tensor([[3, 7, 1, 9]], dtype=torch.int32)
    pos = torch.arange(prefix + n)
    slots = (block_table[0, pos // block_size].long() * block_size + pos % block_size)
    cache, key_cache, value_cache, _, _ = written_cache(isa, block_size, dtype, slots, gen)
    q = torch.randn(n, 2 * H, D, generator=gen).to(dtype)  # GQA: 2 query heads per KV head
    scale = D ** -0.5
    parents = torch.arange(-1, n - 1, dtype=torch.int32)
    cu = torch.tensor([0, n], dtype=torch.int32)
    meta = build_tree_metadata(parents, cu, n)
    ours = tree_attention_cpu(q, cache, isa, block_table, torch.tensor([prefix], dtype=torch.int32),
                              cu, meta.ancestor_bits, scale)
    seq_lens = torch.tensor([prefix + n], dtype=torch.int32)
    query_start = torch.tensor([0, n], dtype=torch.int32)
    sched = ops.cpu_attn_get_scheduler_metadata(1, 2 * H, H, D, seq_lens, dtype, query_start, True, -1, isa, False)
    theirs = torch.empty_like(q)
    ops.cpu_attention_with_kv_cache(q, key_cache, value_cache, theirs, query_start, seq_lens, scale, True,
                                    None, -1, block_table, 0.0, sched, None)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(ours, theirs, atol=tol / 5, rtol=tol)


@pytest.mark.parametrize("isa,block_size,dtype", CASES)
def test_batched_tree_attention_matches_the_per_request_reference(isa, block_size, dtype):
    """Several requests, random trees and prefixes (one at the longest length), GQA."""
    from vllm_respsp_triton import tree_attention_ref

    gen = torch.Generator().manual_seed(2)
    prefixes, sizes = [21, 0, 40], [9, 5, 7]
    block_table = torch.randperm(NUM_BLOCKS, generator=gen)[:12].view(3, 4).int()
    slots = torch.cat([block_table[r, torch.arange(p + n) // block_size].long() * block_size
                       + torch.arange(p + n) % block_size for r, (p, n) in enumerate(zip(prefixes, sizes))])
    cache, _, _, _, _ = written_cache(isa, block_size, dtype, slots, gen)
    parents = torch.cat([torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)])
                         for n in sizes]).int()
    cu = torch.tensor([0, 9, 14, 21], dtype=torch.int32)
    bits = build_tree_metadata(parents, cu, max(sizes)).ancestor_bits
    q = torch.randn(sum(sizes), 2 * H, D, generator=gen).to(dtype)
    prefix_lens = torch.tensor(prefixes, dtype=torch.int32)
    ours = tree_attention_cpu(q, cache, isa, block_table, prefix_lens, cu, bits, 0.125)
    k, v = kv_views(cache, isa)
    reference = tree_attention_ref(q, k, v, block_table, prefix_lens, cu, bits, 0.125)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(ours, reference, atol=tol, rtol=tol)


@pytest.mark.parametrize("isa,block_size,dtype", [CASES[1], CASES[3]])
def test_compaction_moves_the_accepted_path_in_every_layer(isa, block_size, dtype):
    gen = torch.Generator().manual_seed(2)
    prefix = block_size - 2  # the tree straddles a block boundary
    block_table = torch.tensor([[5, 2, 8]], dtype=torch.int32)
    caches = [torch.randn(NUM_BLOCKS, H, block_size, 2 * D, generator=gen).to(dtype) for _ in range(3)]
    before = [c.clone() for c in caches]
    accepted_nodes = torch.tensor([[0, 2, 5, 6]], dtype=torch.int32)  # path through tree nodes 2, 5, 6
    src, dst = compaction_slots(torch.tensor([prefix]), accepted_nodes, torch.tensor([3]), block_table, block_size)
    compact_kv_cpu(caches, isa, src, dst)

    def row(cache, pos):
        k, v = kv_views(cache, isa)
        b, o = int(block_table[0, pos // block_size]), pos % block_size
        return k[b, o], v[b, o]

    for old, new in zip(before, caches):
        for depth, node in enumerate([0, 2, 5, 6]):
            for a, b in zip(row(new, prefix + depth), row(old, prefix + node)):
                assert torch.equal(a, b)
        for pos in range(prefix):  # the prefix is untouched
            for a, b in zip(row(new, pos), row(old, pos)):
                assert torch.equal(a, b)


def test_the_amx_layout_attends_and_compacts_like_the_vec_layout_on_any_cpu():
    """The AMX branch of the tree attention and of the compaction (VNNI tiles), on a cache
    written through our own views (no AMX needed), does what the vec branch does on the same keys
    and values; that our views read what vLLM's AMX writer writes is checked above on CPUs with
    AMX."""
    from vllm_respsp.backends.cpu_paged_kv import kv_tiles, read_slots, write_slots

    gen = torch.Generator().manual_seed(3)
    block_size, sizes, prefixes = 32, [9, 4], [40, 3]
    block_table = torch.tensor([[5, 2], [7, 0]], dtype=torch.int32)
    slots = torch.cat([block_table[r, torch.arange(p + n) // block_size].long() * block_size
                       + torch.arange(p + n) % block_size for r, (p, n) in enumerate(zip(prefixes, sizes))])
    k = torch.randn(slots.numel(), H, D, generator=gen).bfloat16()
    v = torch.randn(slots.numel(), H, D, generator=gen).bfloat16()
    outputs = []
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3, 3, 5, -1, 0, 1, 1], dtype=torch.int32)
    cu = torch.tensor([0, 9, 13], dtype=torch.int32)
    bits = build_tree_metadata(parents, cu, max(sizes)).ancestor_bits
    q = torch.randn(sum(sizes), 2 * H, D, generator=gen).bfloat16()
    for isa in ("vec", "amx"):
        cache = torch.zeros(NUM_BLOCKS, H, block_size, 2 * D, dtype=torch.bfloat16)
        key_view, value_view = kv_tiles(cache, isa)
        write_slots(key_view, slots, k)
        write_slots(value_view, slots, v)
        outputs.append(tree_attention_cpu(q, cache, isa, block_table, torch.tensor(prefixes, dtype=torch.int32),
                                          cu, bits, D ** -0.5))
        src, dst = slots[[44, 47, 30]], slots[[41, 42, 43]]  # one destination is also a source
        compact_kv_cpu([cache], isa, src, dst)
        moved = torch.tensor([44, 47, 30])
        assert torch.equal(read_slots(key_view, dst), k[moved])
        assert torch.equal(read_slots(value_view, dst), v[moved])
        untouched = torch.tensor([i for i in range(slots.numel()) if i not in (41, 42, 43)])
        assert torch.equal(read_slots(key_view, slots[untouched]), k[untouched])
    assert torch.equal(outputs[0], outputs[1])


def test_head_kv_reads_a_context_from_its_first_position():
    """PagedHeadKV over this backend: what `write` put at absolute positions, `gather` returns
    from each request's first position (a context restarted after a long deferral starts past
    0), padded to the longest."""
    from vllm_respsp.runtime.head_kv import PagedHeadKV

    block_size, gen = 16, torch.Generator().manual_seed(3)
    cache = torch.zeros(NUM_BLOCKS, H, block_size, 2 * D)
    table = torch.tensor([[3, 7, 1, 0], [5, 2, 9, 4]], dtype=torch.int32)  # two requests' blocks
    runner = SimpleNamespace(input_batch=SimpleNamespace(
        req_id_to_index={"a": 0, "b": 1},
        block_table=[SimpleNamespace(block_table=SimpleNamespace(gpu=table), block_size=block_size)]))
    kv = PagedHeadKV(runner, SimpleNamespace(kv_cache=cache, isa="vec16"), 0, CpuTreeBackend())
    place = kv.locate(["a", "b"])
    k, v = (torch.randn(40 + 50, H, D, generator=gen) for _ in "kv")
    kv.write(place, [0, 0], [40, 50], k, v)  # a: positions 0..39, b: 0..49
    keys, values = kv.gather(place, [0, 0], [40, 50])
    assert torch.equal(keys[0, :40], k[:40]) and torch.equal(values[1, :50], v[40:])
    keys, values = kv.gather(place, [21, 3], [19, 30])  # a from 21 (to its end), b 3..32
    assert keys.shape == (2, 30, H, D)
    assert torch.equal(keys[0, :19], k[21:40]) and torch.equal(values[0, :19], v[21:40])
    assert torch.equal(keys[1], k[43:73]) and torch.equal(values[1], v[43:73])
