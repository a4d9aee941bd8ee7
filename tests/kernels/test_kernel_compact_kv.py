import random

import pytest
import torch

from vllm_respsp_triton import compact_kv, compact_kv_ref, compaction_slots

BLOCK = 16


def make_request_layout(prefixes, tree_sizes, seed):
    """Shuffled block table covering prefix + tree positions of each request."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-(p + n) // BLOCK) for p, n in zip(prefixes, tree_sizes)]
    num_blocks = sum(pages) + 2
    ids = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.zeros(len(pages), max(pages), dtype=torch.int32)
    for b, count in enumerate(pages):
        table[b, :count] = torch.tensor([ids.pop() for _ in range(count)])
    return table, num_blocks


def random_paths(rng, tree_sizes, max_depth):
    """Increasing node indices starting at the root, like accepted paths."""
    nodes = torch.full((len(tree_sizes), max_depth + 1), -1, dtype=torch.int32)
    lens = []
    for b, n in enumerate(tree_sizes):
        length = rng.randint(0, min(max_depth, n - 1))
        path = [0] + sorted(rng.sample(range(1, n), length))
        nodes[b, : len(path)] = torch.tensor(path)
        lens.append(length)
    return nodes, torch.tensor(lens, dtype=torch.int32)


def expected_after(cache, table, prefixes, nodes, lens):
    """Python model: position prefix+d takes the old content of prefix+node."""
    out = cache.clone()
    for b, prefix in enumerate(prefixes):
        for d in range(1, int(lens[b]) + 1):
            src, dst = prefix + int(nodes[b, d]), prefix + d
            out[:, table[b, dst // BLOCK], dst % BLOCK] = cache[:, table[b, src // BLOCK], src % BLOCK]
    return out


def test_compaction_slots_matches_python():
    prefixes = [15, 0, 33]
    table, _ = make_request_layout(prefixes, [10, 1, 40], seed=0)
    nodes = torch.tensor([[0, 2, 3, -1], [0, -1, -1, -1], [0, 1, 5, 39]], dtype=torch.int32)
    lens = torch.tensor([2, 0, 3], dtype=torch.int32)
    src, dst = compaction_slots(torch.tensor(prefixes), nodes, lens, table, BLOCK)
    assert src.dtype == torch.int64 and src.shape == (3, 3)

    def slot(b, pos):
        return int(table[b, pos // BLOCK]) * BLOCK + pos % BLOCK

    # Request 2's node 1 already sits at path index 1: no copy.
    assert src.tolist() == [
        [slot(0, 17), slot(0, 18), -1],
        [-1, -1, -1],
        [-1, slot(2, 38), slot(2, 72)],
    ]
    assert dst.tolist() == [
        [slot(0, 16), slot(0, 17), -1],
        [-1, -1, -1],
        [-1, slot(2, 35), slot(2, 36)],
    ]


@pytest.mark.parametrize("reverse_columns", [False, True])
@pytest.mark.parametrize("use_kernel", [False, True])
def test_overlap_hazard_gather_then_scatter(use_kernel, reverse_columns):
    # Path [0, 2, 3]: dst offset 2 is also the source of offset 2's copy
    # (dst 1 <- src 2, dst 2 <- src 3).  Parallel copies run in no set order;
    # if dst 2 is written before src 2 is read, node 3's row lands in both.
    prefixes = [BLOCK - 2]  # tree straddles a block boundary
    table, num_blocks = make_request_layout(prefixes, [5], seed=1)
    nodes = torch.tensor([[0, 2, 3]], dtype=torch.int32)
    lens = torch.tensor([2], dtype=torch.int32)
    layers = [torch.randn(2, num_blocks, BLOCK, 2, 8) for _ in range(3)]
    want = [expected_after(c, table, prefixes, nodes, lens) for c in layers]
    src, dst = compaction_slots(torch.tensor(prefixes), nodes, lens, table, BLOCK)

    naive = layers[0].clone()
    for s, d in reversed(list(zip(src[0].tolist(), dst[0].tolist()))):
        naive[:, d // BLOCK, d % BLOCK] = naive[:, s // BLOCK, s % BLOCK]
    assert not torch.equal(naive, want[0])  # the hazard really bites

    if reverse_columns:  # the order of copies within a row must not matter
        src, dst = src.flip(1), dst.flip(1)
    (compact_kv if use_kernel else compact_kv_ref)(layers, src, dst)
    for got, expected in zip(layers, want):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference_random(stacked, dtype):
    rng = random.Random(2)
    prefixes = [0, 15, 16, 31, 40]
    sizes = [1, 9, 30, 12, 65]
    table, num_blocks = make_request_layout(prefixes, sizes, seed=3)
    nodes, lens = random_paths(rng, sizes, max_depth=8)
    src, dst = compaction_slots(torch.tensor(prefixes), nodes, lens, table, BLOCK)
    g = torch.Generator().manual_seed(4)
    base = torch.randn(4, 2, num_blocks, BLOCK, 2, 16, generator=g).to(dtype)
    want = torch.stack([expected_after(c, table, prefixes, nodes, lens) for c in base])

    ref_caches = [c.clone() for c in base]
    compact_kv_ref(ref_caches, src, dst)
    assert torch.equal(torch.stack(ref_caches), want)

    if stacked:
        kernel_caches = base.clone()
        compact_kv(kernel_caches, src, dst)
        assert torch.equal(kernel_caches, want)
    else:  # separate allocations, one launch through the address table
        kernel_caches = [c.clone() for c in base]
        compact_kv(kernel_caches, src, dst)
        assert torch.equal(torch.stack(kernel_caches), want)


def test_kernel_mixed_layouts_fall_back_per_layer():
    prefixes = [3, 20]
    table, num_blocks = make_request_layout(prefixes, [6, 8], seed=5)
    nodes = torch.tensor([[0, 3, 5], [0, 1, 7]], dtype=torch.int32)
    lens = torch.tensor([2, 2], dtype=torch.int32)
    src, dst = compaction_slots(torch.tensor(prefixes), nodes, lens, table, BLOCK)
    contiguous = torch.randn(2, num_blocks, BLOCK, 2, 8)
    # Same shape, different strides: heads and blocks permuted in memory.
    permuted = torch.randn(BLOCK, 2, num_blocks, 2, 8).permute(1, 2, 0, 3, 4)
    layers = [contiguous, permuted]
    want = [expected_after(c, table, prefixes, nodes, lens) for c in layers]
    compact_kv(layers, src, dst)
    for got, expected in zip(layers, want):
        assert torch.equal(got, expected)
