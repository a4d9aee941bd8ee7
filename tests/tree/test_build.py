"""The batched, ragged EAGLE-3 tree builder against a one-request-at-a-time brute force."""

import heapq
import random

import pytest
import torch

from vllm_respsp.tree.build import TreeBuilder, build_trees
from vllm_respsp.tree.shape import TreeShape, chain

VOCAB = 50


def path_logprobs(path: tuple[int, ...], seed: int) -> torch.Tensor:
    """A fixed, random draft distribution for every token path (the 'draft model')."""
    g = torch.Generator().manual_seed(hash((seed,) + path) % (2**31))
    return torch.log_softmax(torch.randn(VOCAB, generator=g, dtype=torch.float64) * 2, -1)


def candidate_path(builder, candidate: int) -> tuple[int, ...]:
    tokens, parents = torch.cat(builder.tokens), torch.cat(builder.parents)
    path = []
    while candidate >= 0:
        path.append(int(tokens[candidate]))
        candidate = int(parents[candidate])
    return tuple(reversed(path))


def batched_tree(shapes, roots, seed, calls=None):
    def draft_fn(frontier, builder):
        if calls is not None:
            calls.append(frontier.token.numel())
        return torch.stack([path_logprobs((roots[int(r)],) + candidate_path(builder, int(c)), seed)
                            for r, c in zip(frontier.request, frontier.candidate)])

    root_lp = torch.stack([path_logprobs((r,), seed) for r in roots])
    return build_trees(shapes, torch.tensor(roots), root_lp, draft_fn)


def brute_force(shape: TreeShape, root: int, seed: int) -> dict[tuple, float]:
    """EAGLE-3's topK_generate for one request, written plainly: {path: cumulative score}."""
    k = shape.top_k

    def children(path, score):
        lp = path_logprobs((root,) + path, seed)
        top = torch.topk(lp, k)
        return [(path + (int(t),), score + float(v)) for v, t in zip(top.values, top.indices)]

    candidates = children((), 0.0)
    frontier = list(candidates)
    for _ in range(shape.depth - 1):
        kids = [c for p, s in frontier for c in children(p, s)]
        candidates += kids
        frontier = heapq.nlargest(k, kids, key=lambda c: c[1])
    best = sorted(candidates, key=lambda c: (-c[1], len(c[0])))[: shape.total_tokens]
    return dict(best)


SHAPES = [chain(1), chain(5), TreeShape(8, 3, 2), TreeShape(16, 4, 4), TreeShape(10, 2, 8),
          TreeShape(32, 5, 3), TreeShape(3, 1, 3)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ragged_batch_matches_brute_force(seed):
    rng = random.Random(seed)
    shapes = [rng.choice(SHAPES) for _ in range(6)]
    roots = [rng.randrange(VOCAB) for _ in shapes]
    calls = []
    tree = batched_tree(shapes, roots, seed, calls)
    assert len(calls) == max(s.depth for s in shapes) - 1  # one draft call per level
    for b, (shape, root) in enumerate(zip(shapes, roots)):
        expected = brute_force(shape, root, seed)
        sub = tree.request(b)
        paths = tree.paths(b)
        assert int(sub.tokens[0]) == root and paths[0] == ()
        assert set(paths[1:]) == set(expected) and len(paths) == shape.total_tokens + 1
        for path, score in zip(paths[1:], sub.scores[1:].tolist()):
            assert score == pytest.approx(expected[path])


def test_tree_invariants_breadth_first_and_connected():
    shapes = [TreeShape(20, 4, 5), chain(3), TreeShape(7, 2, 4)]
    tree = batched_tree(shapes, [1, 2, 3], seed=7)
    for b, shape in enumerate(shapes):
        sub = tree.request(b)
        parents, depths = sub.parents.tolist(), sub.depths.tolist()
        assert parents[0] == -1 and depths[0] == 0
        for i in range(1, len(parents)):
            assert 0 <= parents[i] < i
            assert depths[i] == depths[parents[i]] + 1
        assert depths == sorted(depths)  # breadth-first: any prefix is a tree
        assert max(depths) <= shape.depth
    assert tree.cu_nodes.tolist() == [0, 21, 25, 33]


def test_chain_is_greedy_path():
    tree = batched_tree([chain(4)], [9], seed=3)
    path = tree.paths(0)[-1]
    expect, cur = [], (9,)
    for _ in range(4):
        t = int(path_logprobs(cur, 3).argmax())
        expect.append(t)
        cur += (t,)
    assert list(path) == expect


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_confidence_bounded_shapes_keep_the_unbounded_trees_nodes_above_the_bound(seed):
    """A bounded shape's tree = the best total_tokens of the unbounded beam's candidates at level
    1 or under a parent scoring >= log(min_prob); no node below the bound is ever expanded."""
    rng = random.Random(seed)
    caps = [TreeShape(8, 8, 1), TreeShape(22, 6, 2), TreeShape(20, 4, 4)]
    shapes = [TreeShape(c.total_tokens, c.depth, c.top_k, rng.choice([0.02, 0.05, 0.15]))
              for c in caps] + [chain(3)]
    roots = [rng.randrange(VOCAB) for _ in shapes]
    calls = []
    tree = batched_tree(shapes, roots, seed, calls)
    unbounded_rows = sum(s.top_k * (s.depth - 1) for s in caps)
    assert sum(calls) < unbounded_rows + 2  # pruned frontier nodes were not expanded
    sizes = []
    for b, (shape, root) in enumerate(zip(shapes, roots)):
        full = TreeShape(shape.capacity, shape.depth, shape.top_k)
        beam = brute_force(full, root, seed)
        grown = {p: s for p, s in beam.items() if len(p) == 1 or beam[p[:-1]] >= shape.log_min_prob}
        expected = dict(sorted(grown.items(), key=lambda c: (-c[1], len(c[0])))[:shape.total_tokens])
        paths = tree.paths(b)[1:]
        assert set(paths) == set(expected)
        sizes.append(len(paths))
    assert any(n < s.total_tokens for n, s in zip(sizes[:3], shapes)), sizes  # the bound bit


def test_a_bound_above_every_node_leaves_level_one():
    tree = batched_tree([TreeShape(8, 4, 2, 0.999), chain(2)], [4, 5], seed=0)
    assert tree.cu_nodes.tolist() == [0, 3, 6]


def test_eagle3_default_tree_has_eagle3s_sixty_tokens():
    """EAGLE-3's default total_token=60 counts the root (the bonus token); T here does not:
    the default tree verifies 60 tokens, root included, over 8 draft levels of top-10."""
    from vllm_respsp.tree.shape import EAGLE3_DEFAULT

    tree = batched_tree([EAGLE3_DEFAULT], [7], seed=0, calls=[])
    assert EAGLE3_DEFAULT == TreeShape(59, 8, 10)
    assert tree.request(0).tokens.numel() == 60 and max(len(p) for p in tree.paths(0)) <= 8


@pytest.mark.parametrize("depth,batch", [(1, 1), (3, 1), (4, 5)])
def test_plain_chains_skip_the_rerank_and_give_what_it_gives(depth, batch):
    """A step of whole chains of one depth is laid out from its levels as they are; the result
    equals the general rerank's on the same candidates."""
    roots = list(range(7, 7 + batch))
    builder = {}

    def draft_fn(frontier, b):
        builder["b"] = b
        return torch.stack([path_logprobs((roots[int(r)],) + candidate_path(b, int(c)), 0)
                            for r, c in zip(frontier.request, frontier.candidate)])

    shapes = [chain(depth)] * batch
    root_lp = torch.stack([path_logprobs((r,), 0) for r in roots])
    fast = build_trees(shapes, torch.tensor(roots), root_lp, draft_fn)
    b = builder.get("b") or TreeBuilder(shapes, torch.tensor(roots))
    if "b" not in builder:  # depth 1: no draft call; grow the one level again
        b.root_level(root_lp)
    assert b._plain_chains()
    slow = b._reranked()
    for field in ("tokens", "parents", "depths", "scores", "cu_nodes"):
        assert torch.equal(getattr(fast, field), getattr(slow, field)), field
    assert not TreeBuilder([chain(2), chain(3)], torch.tensor([1, 2]))._plain_chains()
    assert not TreeBuilder([TreeShape(3, 3, 1, 0.5)], torch.tensor([1]))._plain_chains()
