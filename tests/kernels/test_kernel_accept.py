import random

import pytest
import torch

from vllm_respsp_triton import MAX_TREE_NODES, accept_greedy, accept_greedy_ref, build_tree_metadata_ref

from .kernel_trees import big_tree, chain_tree, eagle_tree, greedy_walk, pack, sample_batch

VOCAB = 5  # tiny vocabulary so that draft tokens often match


def make_tokens(trees, rng, match_rate=0.6):
    """Draft/target tokens where each node's target often equals one of its
    children's draft tokens, so acceptance paths get long."""
    draft, target = [], []
    for parents in trees:
        d = [rng.randrange(VOCAB) for _ in parents]
        t = [rng.randrange(VOCAB) for _ in parents]
        for i, p in enumerate(parents):
            if p >= 0 and rng.random() < match_rate:
                t[p] = d[i]
        draft += d
        target += t
    return torch.tensor(draft, dtype=torch.int64), torch.tensor(target, dtype=torch.int64)


def oracle(trees, draft, target, max_depth):
    lens, paths, bonus, row = [], [], [], 0
    for parents in trees:
        n = len(parents)
        path, b = greedy_walk(
            parents, draft[row : row + n].tolist(), target[row : row + n].tolist(), max_depth
        )
        lens.append(len(path) - 1)
        paths.append(path + [-1] * (max_depth + 1 - len(path)))
        bonus.append(b)
        row += n
    return lens, paths, bonus


def run_both(trees, draft, target, max_depth):
    parents, cu = pack(trees)
    meta = build_tree_metadata_ref(parents, cu, MAX_TREE_NODES)
    args = (draft, target, meta.first_child, meta.next_sibling, cu, max_depth)
    return accept_greedy(*args), accept_greedy_ref(*args)  # kernel (interpreter), reference


def check(trees, draft, target, max_depth):
    (k_len, k_nodes, k_bonus), (r_len, r_nodes, r_bonus) = run_both(trees, draft, target, max_depth)
    lens, paths, bonus = oracle(trees, draft, target, max_depth)
    assert r_len.tolist() == lens and r_nodes.tolist() == paths and r_bonus.tolist() == bonus
    assert torch.equal(k_len, r_len) and torch.equal(k_nodes, r_nodes)
    assert torch.equal(k_bonus, r_bonus)
    assert k_len.dtype == torch.int32 and k_nodes.dtype == torch.int32
    assert k_bonus.dtype == target.dtype
    return lens


@pytest.mark.parametrize("seed", range(4))
def test_random_batches(seed):
    rng = random.Random(seed)
    trees = sample_batch(rng, 10, 40)
    draft, target = make_tokens(trees, rng, match_rate=0.85)
    lens = check(trees, draft, target, max_depth=40)
    assert max(lens) >= 2  # the test data really exercises multi-step paths


def test_root_only_requests():
    trees = [[-1], [-1], [-1]]
    draft = torch.tensor([4, 5, 6])
    target = torch.tensor([7, 8, 9])
    assert check(trees, draft, target, max_depth=8) == [0, 0, 0]


def test_full_chain_is_accepted_and_capped_by_max_depth():
    n = 12
    draft = torch.arange(n, dtype=torch.int64)
    target = torch.arange(1, n + 1, dtype=torch.int64)  # node i predicts node i+1
    assert check([chain_tree(n)], draft, target, max_depth=11) == [11]
    assert check([chain_tree(n)], draft, target, max_depth=5) == [5]


def test_first_matching_sibling_wins():
    # Root has children 1,2,3 with tokens 7,9,9: target 9 must pick node 2.
    trees = [[-1, 0, 0, 0, 3, 2]]
    draft = torch.tensor([0, 7, 9, 9, 1, 1])
    target = torch.tensor([9, 0, 1, 0, 0, 3])
    (k_len, k_nodes, k_bonus), _ = run_both(trees, draft, target, 4)
    assert k_len.tolist() == [2]
    assert k_nodes.tolist() == [[0, 2, 5, -1, -1]]
    assert k_bonus.tolist() == [3]
    check(trees, draft, target, 4)


def test_big_tree_next_to_empty_requests():
    rng = random.Random(7)
    trees = [[-1], big_tree(rng), [-1], eagle_tree(8, 32, 128, rng)]
    draft, target = make_tokens(trees, rng, match_rate=0.8)
    check(trees, draft, target, max_depth=8)
