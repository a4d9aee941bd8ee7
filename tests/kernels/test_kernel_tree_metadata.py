import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_respsp_triton import (
    MAX_TREE_NODES,
    build_tree_metadata,
    build_tree_metadata_ref,
    num_words,
    unpack_ancestor_bits,
)
from vllm_respsp_triton.tree_metadata import _build_tree_metadata_triton

from .kernel_trees import (
    ancestors,
    big_tree,
    chain_tree,
    children_of,
    eagle_tree,
    pack,
    random_tree,
    sample_batch,
)


def assert_matches_oracle(meta, trees, max_nodes):
    """Check every field against parent-walking in plain Python."""
    n_words = num_words(max_nodes)
    assert meta.ancestor_bits.shape == (sum(map(len, trees)), n_words)
    assert meta.ancestor_bits.dtype == torch.int32
    bits = meta.ancestor_bits.tolist()
    row = 0
    for parents in trees:
        kids = children_of(parents)
        for i in range(len(parents)):
            words = [w & 0xFFFFFFFF for w in bits[row + i]]
            got = {j for j in range(32 * n_words) if (words[j // 32] >> (j % 32)) & 1}
            assert got == set(ancestors(parents, i)), (parents, i)
            assert meta.depths[row + i] == len(ancestors(parents, i)) - 1
            assert meta.first_child[row + i] == (kids[i][0] if kids[i] else -1)
            siblings = kids[parents[i]] if parents[i] >= 0 else []
            later = [s for s in siblings if s > i]
            assert meta.next_sibling[row + i] == (later[0] if later else -1)
        row += len(parents)


def assert_same(a, b):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)


EDGE_BATCHES = {
    "root_only": [[-1]],
    "chain_129": [chain_tree(129)],
    "chain_33_and_roots": [[-1], chain_tree(33), [-1]],
    "big_tree": [big_tree(random.Random(1))],
    "big_next_to_empty": [[-1], big_tree(random.Random(2)), [-1], chain_tree(64)],
    "star_128": [[-1] + [0] * 128],
}


@pytest.mark.parametrize("name", sorted(EDGE_BATCHES))
def test_reference_matches_oracle_edge_cases(name):
    trees = EDGE_BATCHES[name]
    parents, cu = pack(trees)
    assert_matches_oracle(build_tree_metadata_ref(parents, cu, MAX_TREE_NODES), trees, MAX_TREE_NODES)


@pytest.mark.parametrize("seed", range(3))
def test_reference_matches_oracle_random(seed):
    rng = random.Random(seed)
    trees = sample_batch(rng, 12, MAX_TREE_NODES)
    parents, cu = pack(trees)
    assert_matches_oracle(build_tree_metadata_ref(parents, cu, MAX_TREE_NODES), trees, MAX_TREE_NODES)


def test_sign_bit_is_exercised():
    # Chains of 33 and 64 nodes set bit 31 of word 0 (and word 1): the
    # words must come out negative, and decode back correctly.
    parents, cu = pack([chain_tree(64)])
    meta = _build_tree_metadata_triton(parents, cu, 64)
    assert meta.ancestor_bits[63].tolist() == [-1, -1]
    assert meta.ancestor_bits[31].tolist() == [-1, 0]
    assert meta.ancestor_bits[32].tolist() == [-1, 1]
    assert unpack_ancestor_bits(meta.ancestor_bits, 64)[40].sum() == 41


@pytest.mark.parametrize("name", sorted(EDGE_BATCHES))
def test_kernel_matches_reference_edge_cases(name):
    parents, cu = pack(EDGE_BATCHES[name])
    assert_same(
        _build_tree_metadata_triton(parents, cu, MAX_TREE_NODES),
        build_tree_metadata_ref(parents, cu, MAX_TREE_NODES),
    )


@pytest.mark.parametrize("seed", range(3))
def test_kernel_matches_reference_random_batch(seed):
    rng = random.Random(100 + seed)
    trees = sample_batch(rng, 10, MAX_TREE_NODES)
    trees.append(eagle_tree(8, 10, 64, rng))
    parents, cu = pack(trees)
    got = build_tree_metadata(parents, cu, MAX_TREE_NODES)  # public dispatch -> kernel
    assert_same(got, build_tree_metadata_ref(parents, cu, MAX_TREE_NODES))
    assert_matches_oracle(got, trees, MAX_TREE_NODES)


def test_small_max_nodes_uses_one_word():
    trees = [random_tree(20, random.Random(5)), [-1], chain_tree(32)]
    parents, cu = pack(trees)
    got = _build_tree_metadata_triton(parents, cu, 32)
    assert got.ancestor_bits.shape == (53, 1)
    assert_same(got, build_tree_metadata_ref(parents, cu, 32))


def test_reference_rejects_bad_parents():
    parents, cu = pack([[-1, 0, 2]])
    with pytest.raises(AssertionError):
        build_tree_metadata_ref(parents, cu, 8)


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 70), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_kernel_property_random_trees(sizes, seed):
    rng = random.Random(seed)
    trees = [random_tree(n, rng, bfs=rng.random() < 0.5) for n in sizes]
    parents, cu = pack(trees)
    got = _build_tree_metadata_triton(parents, cu, 70)
    assert_matches_oracle(got, trees, 70)
