import math
import random

import pytest
import torch

from vllm_respsp_triton import MAX_TREE_NODES, build_tree_metadata_ref, tree_attention, tree_attention_ref
from vllm_respsp_triton.tree_attention import _tree_attention_triton

from .kernel_trees import ancestors, big_tree, chain_tree, eagle_tree, pack, random_tree

BLOCK = 16


def make_case(trees, prefixes, num_q_heads, num_kv_heads, head_size, dtype, seed):
    """Random q and per-request contiguous K/V, scattered into a paged cache
    through a shuffled block table (so pages are not in order)."""
    g = torch.Generator().manual_seed(seed)
    parents, cu = pack(trees)
    total = int(cu[-1])
    lengths = [p + len(t) for p, t in zip(prefixes, trees)]
    pages = [-(-length // BLOCK) for length in lengths]
    num_blocks = sum(pages) + 3
    block_ids = torch.randperm(num_blocks, generator=g).tolist()
    block_table = torch.zeros(len(trees), max(pages), dtype=torch.int32)
    k_cache = torch.randn(num_blocks, BLOCK, num_kv_heads, head_size, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, BLOCK, num_kv_heads, head_size, generator=g).to(dtype)
    contiguous_kv = []
    for b, length in enumerate(lengths):
        mine = [block_ids.pop() for _ in range(pages[b])]
        block_table[b, : pages[b]] = torch.tensor(mine)
        k = torch.randn(length, num_kv_heads, head_size, generator=g).to(dtype)
        v = torch.randn(length, num_kv_heads, head_size, generator=g).to(dtype)
        for pos in range(length):
            k_cache[mine[pos // BLOCK], pos % BLOCK] = k[pos]
            v_cache[mine[pos // BLOCK], pos % BLOCK] = v[pos]
        contiguous_kv.append((k, v))
    q = torch.randn(total, num_q_heads, head_size, generator=g).to(dtype)
    meta = build_tree_metadata_ref(parents, cu, MAX_TREE_NODES)
    args = (q, k_cache, v_cache, block_table, torch.tensor(prefixes, dtype=torch.int32), cu,
            meta.ancestor_bits, head_size**-0.5)
    return args, contiguous_kv


def dense_oracle(args, trees, prefixes, contiguous_kv):
    """Masked softmax over explicitly gathered contiguous K/V; the mask comes
    from walking parent links, not from the bitmask."""
    q, scale = args[0], args[7]
    num_q_heads, num_kv_heads = q.shape[1], contiguous_kv[0][0].shape[1]
    group = num_q_heads // num_kv_heads
    out, row = torch.empty(q.shape, dtype=torch.float64), 0
    for parents, prefix, (k, v) in zip(trees, prefixes, contiguous_kv):
        for i in range(len(parents)):
            visible = list(range(prefix)) + [prefix + j for j in ancestors(parents, i)]
            for h in range(num_q_heads):
                kh = k[visible, h // group].double()
                vh = v[visible, h // group].double()
                s = (kh @ q[row + i, h].double()) * scale
                out[row + i, h] = torch.softmax(s, 0) @ vh
        row += len(parents)
    return out


def small_batch(seed):
    rng = random.Random(seed)
    trees = [[-1], random_tree(20, rng), chain_tree(5), eagle_tree(3, 4, 12, rng), [-1, 0]]
    prefixes = [16, 15, 0, 17, 31]  # at / one before / one after a block boundary
    return trees, prefixes


@pytest.mark.parametrize("heads", [(4, 2), (6, 2), (2, 2)])
def test_reference_matches_dense_oracle(heads):
    trees, prefixes = small_batch(0)
    args, kv = make_case(trees, prefixes, *heads, 32, torch.float32, seed=1)
    want = dense_oracle(args, trees, prefixes, kv)
    torch.testing.assert_close(tree_attention_ref(*args).double(), want, atol=1e-5, rtol=1e-5)


def test_reference_big_tree_matches_oracle():
    trees, prefixes = [big_tree(random.Random(3)), [-1]], [32, 5]
    args, kv = make_case(trees, prefixes, 2, 1, 16, torch.float32, seed=2)
    want = dense_oracle(args, trees, prefixes, kv)
    torch.testing.assert_close(tree_attention_ref(*args).double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "heads,head_size,block_q",
    [((4, 2), 64, None), ((6, 2), 64, 4), ((8, 2), 128, 16), ((2, 2), 64, 64)],
)
def test_kernel_matches_reference_fp32(heads, head_size, block_q):
    trees, prefixes = small_batch(4)
    args, _ = make_case(trees, prefixes, *heads, head_size, torch.float32, seed=3)
    got = _tree_attention_triton(*args, block_q=block_q)
    torch.testing.assert_close(got, tree_attention_ref(*args), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_reference_half(dtype):
    trees, prefixes = small_batch(5)
    args, _ = make_case(trees, prefixes, 4, 1, 64, dtype, seed=4)
    got = tree_attention(*args)  # public dispatch -> kernel under the interpreter
    want = tree_attention_ref(*args)
    assert got.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_kernel_big_tree_next_to_root_only():
    # 129-node tree (depth 8, fan-out 32): five bitmask words, sign bits set.
    trees = [[-1], big_tree(random.Random(6)), [-1]]
    prefixes = [3, 16, 0]
    args, kv = make_case(trees, prefixes, 2, 1, 32, torch.float32, seed=5)
    got = _tree_attention_triton(*args, block_q=32)
    torch.testing.assert_close(got, tree_attention_ref(*args), atol=2e-5, rtol=2e-5)
    want = dense_oracle(args, trees, prefixes, kv)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_kernel_chain_crossing_word_and_block_boundaries():
    trees, prefixes = [chain_tree(70)], [BLOCK - 1]
    args, _ = make_case(trees, prefixes, 2, 2, 32, torch.float32, seed=6)
    got = _tree_attention_triton(*args, block_q=16)
    torch.testing.assert_close(got, tree_attention_ref(*args), atol=2e-5, rtol=2e-5)


def test_mask_matters():
    # Sanity that the comparison can fail: attending to the whole tree gives
    # a different answer from attending to ancestors only.
    trees, prefixes = [random_tree(10, random.Random(9))], [4]
    args, _ = make_case(trees, prefixes, 2, 1, 16, torch.float32, seed=7)
    all_visible = list(args)
    all_visible[6] = torch.full_like(args[6], -1)
    assert not torch.allclose(tree_attention_ref(*all_visible), tree_attention_ref(*args), atol=1e-3)
    assert math.isfinite(float(_tree_attention_triton(*all_visible).abs().max()))
