"""Draft pools: every shape derived from a recorded beam equals that shape built directly.

The 'draft model' is test_build's fixed random distribution per token path; the 'target's
output' after each root follows the draft's greedy path for a random number of tokens and then
deviates, so trees are accepted to every depth."""

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_respsp.engine_tools.record import accepted_lengths, matched_nodes
from vllm_respsp.policy.pools import DraftPool, PoolError, pool_depths, pool_shape, realize
from vllm_respsp.tree.build import build_trees
from vllm_respsp.tree.shape import TreeShape, chain

sys.path.insert(0, str(Path(__file__).parents[1] / "tree"))
from test_build import VOCAB, candidate_path, path_logprobs  # noqa: E402

POSITIONS = 40
POOLS = [pool_shape(6, 1), pool_shape(4, 2), pool_shape(3, 4)]
SHAPES = [chain(1), chain(4), chain(6), TreeShape(6, 6, 1, 0.3), TreeShape(3, 3, 1, 0.05),
          TreeShape(4, 2, 2), TreeShape(10, 4, 2), TreeShape(10, 4, 2, 0.1), TreeShape(3, 3, 2, 0.02),
          TreeShape(8, 3, 4), TreeShape(20, 3, 4, 0.01), TreeShape(5, 2, 4, 0.2),
          # verify bounds: the first draft may go, trees lose their weak leaves
          chain(1, 0, 0.3), chain(4, 0, 0.1), TreeShape(6, 6, 1, 0.3, 0.05), TreeShape(10, 4, 2, 0, 0.05),
          TreeShape(20, 3, 4, 0.01, 0.02)]


def build(shapes, root, seed):
    """(tree, per-request draft rows and levels) built directly for one position."""
    rows = [0] * len(shapes)
    levels = [1] * len(shapes)

    def draft_fn(frontier, builder):
        for r in set(frontier.request.tolist()):
            levels[r] += 1
        for r in frontier.request.tolist():
            rows[r] += 1
        return torch.stack([path_logprobs((root,) + candidate_path(builder, int(c)), seed)
                            for c in frontier.candidate])

    tree = build_trees(shapes, torch.full((len(shapes),), root), path_logprobs((root,), seed)[None]
                       .expand(len(shapes), -1), draft_fn)
    return tree, [1 + r for r in rows], levels


def output_after(root, seed, rng):
    """The greedy draft path for a random number of tokens, then a token off it."""
    out, path = [root], ()
    for _ in range(rng.randrange(0, 7)):
        t = int(path_logprobs((root,) + path, seed).argmax())
        out.append(t)
        path += (t,)
    out.append(rng.randrange(VOCAB))
    return np.array(out + [rng.randrange(VOCAB) for _ in range(8)])


def trees_of(tree):
    return tuple(t.numpy() for t in (tree.tokens, tree.parents, tree.depths, tree.cu_nodes))


@pytest.fixture(scope="module")
def positions():
    rng = random.Random(0)
    out = []
    for p in range(POSITIONS):
        root, seed = rng.randrange(VOCAB), 1000 + p
        out.append((root, seed, output_after(root, seed, rng)))
    return out


@pytest.fixture(scope="module")
def pools(positions):
    scores = {s: [] for s in POOLS}
    matched = {s: [] for s in POOLS}
    parents = {s: [] for s in POOLS}
    for root, seed, output in positions:
        tree, _, _ = build(POOLS, root, seed)
        hit = matched_nodes(trees_of(tree), np.zeros(len(POOLS), dtype=np.int64), output)
        for b, shape in enumerate(POOLS):
            nodes = slice(int(tree.cu_nodes[b]) + 1, int(tree.cu_nodes[b + 1]))
            assert tree.depths[nodes].tolist() == pool_depths(shape).tolist()
            scores[shape].append(tree.scores[nodes].float().numpy())
            matched[shape].append(hit[nodes])
            parents[shape].append(tree.parents[nodes].numpy() - 1)  # pool index: root dropped
    return [DraftPool(s, np.stack(scores[s]), np.stack(matched[s]), np.stack(parents[s]).astype(np.int16))
            for s in POOLS]


def test_every_derived_shape_equals_the_shape_built_directly(positions, pools):
    derived = {s: realize(pools, s) for s in SHAPES}
    bounded_sizes, verify_cut = set(), set()
    for p, (root, seed, output) in enumerate(positions):
        tree, rows, levels = build(SHAPES, root, seed)
        accepted = accepted_lengths(trees_of(tree), np.zeros(len(SHAPES), dtype=np.int64), output)
        for b, shape in enumerate(SHAPES):
            acc, work = derived[shape]
            sub = tree.request(b)
            nodes = sub.tokens.numel() - 1
            depth = int(sub.depths.max())
            assert (acc[p], work.nodes[p], work.levels[p], work.rows[p]) == \
                (accepted[b], nodes, levels[b], rows[b]), (shape, p)
            assert work.tree[p] == int(nodes > depth)
            if shape.bounded:
                bounded_sizes.add(nodes)
            if shape.verify_min_prob:
                verify_cut.add(nodes < shape.total_tokens)
    assert len(bounded_sizes) > 3  # the bounds really vary the trees
    assert verify_cut == {True, False}  # and a verify bound cuts some trees, not all
    assert max(int(a.max()) for a, _ in derived.values()) >= 4  # and deep paths get accepted


def test_a_shape_no_pool_covers_is_named(pools):
    with pytest.raises(PoolError, match="T8/D7/K1: no recorded pool has width 1 and depth >= 7"):
        realize(pools, chain(7).__class__(8, 7, 1))
    with pytest.raises(PoolError, match="width 3"):
        realize(pools, TreeShape(4, 2, 3))


def test_traces_derive_any_covered_shape_and_the_drafted_scores_bound_feature(positions, pools):
    from vllm_respsp.policy.traces import FeatureSpec, Generation, TraceSet
    from vllm_respsp.policy.train import DRAFTED_SCORES, select_features
    from vllm_respsp.tree.shape import NO_DRAFTS

    gen = Generation("p", "s", np.zeros((POSITIONS, 2), np.float32), np.zeros((POSITIONS, 0), np.int16),
                     pools=pools)
    traces = TraceSet([], [FeatureSpec("x", 2)], [gen]).with_actions(SHAPES[:3] + [NO_DRAFTS]).validate()
    np.testing.assert_array_equal(traces.generations[0].accepted[:, 1], realize(pools, chain(4))[0])
    assert (traces.generations[0].work.nodes[:, 3] == 0).all() and (traces.generations[0].work.levels[:, 3] == 1).all()
    bound = select_features(traces, ["x", DRAFTED_SCORES])
    assert bound.feature_dim == 2 + 6 + 4 + 3
    best_depth2_k2 = np.exp(pools[1].scores[:, 2:6].max(-1))  # K2 pool: 2 nodes at depth 1, 4 at depth 2
    np.testing.assert_allclose(bound.generations[0].features[:, 2 + 6 + 1], best_depth2_k2, rtol=1e-6)
