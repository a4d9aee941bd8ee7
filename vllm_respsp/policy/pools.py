"""Draft pools: a recorded beam's every candidate, from which any tree of its width is derived.

A pool is the whole candidate set of one unbounded beam of width K grown D levels deep at one
position (the shape (capacity, D, K)): K nodes at level 1, K² at each further level, in the tree
builder's breadth-first order, each with its parent, its cumulative draft score and whether its
path equals the continuation the target produced (`matched`).

Every shape (T, d <= D, K, min_prob, verify_min_prob) at that position is a subset of the pool
(tree.build); with e = max(min_prob, verify_min_prob), the bound a node must reach to expand:
    drafted    nodes of depth <= d at level 1 or under a parent scoring >= log(e)
    verified   the best T drafted nodes scoring >= log(verify_min_prob), by (score desc, depth
               asc, pool order): the builder's rerank, ties included
    accepted   matched nodes among the verified (they form the accepted chain, one per depth)
    levels     1 + the levels j < d holding a node >= log(e) (none: drafting ends)
    rows       1 + sum over those levels of min(K, such nodes at j): the expanded frontier
               (the beam's top K; nodes at or above the bound always rank first)
So one recording of a few wide, deep beams gives the exact accepted length *and* the exact work
of every static and confidence-bounded shape, at every position (design.md §6).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vllm_respsp.policy.cost import StepWork
from vllm_respsp.tree.shape import TreeShape


class PoolError(ValueError):
    """A shape no recorded pool can give, or a malformed pool; the message names both."""


def pool_shape(depth: int, top_k: int) -> TreeShape:
    """The unbounded beam a pool records: every candidate of a depth-`depth`, width-`top_k` beam."""
    return TreeShape(top_k + (depth - 1) * top_k**2, depth, top_k)


def pool_depths(shape: TreeShape) -> np.ndarray:
    """Depth of each pool node in breadth-first order: K at level 1, K² at every further level."""
    k = shape.top_k
    return np.concatenate([np.full(k if d == 1 else k * k, d, dtype=np.int8)
                           for d in range(1, shape.depth + 1)])


@dataclass
class DraftPool:
    """One pool at every position of a generation."""

    shape: TreeShape  # pool_shape(D, K)
    scores: np.ndarray  # float32 [P, N] cumulative draft log-probability of each node
    matched: np.ndarray  # bool [P, N] the node's path equals the next tokens of the output
    parents: np.ndarray  # int16 [P, N] pool index of each node's parent, -1 at level 1

    def __post_init__(self):
        n = self.shape.capacity
        if self.scores.ndim != 2 or self.scores.shape[1] != n or \
                not self.matched.shape == self.parents.shape == self.scores.shape:
            raise PoolError(f"pool {self.shape}: scores {self.scores.shape}, matched "
                            f"{self.matched.shape} and parents {self.parents.shape} must all be "
                            f"[positions, {n}]")

    def serves(self, shape: TreeShape) -> bool:
        return shape.top_k == self.shape.top_k and shape.depth <= self.shape.depth and shape.drafts

    def realize(self, shape: TreeShape) -> tuple[np.ndarray, StepWork]:
        """(accepted draft tokens int16 [P], the work per position) of `shape` at every position."""
        if not self.serves(shape):
            raise PoolError(f"shape {shape} needs a pool of width {shape.top_k} and depth >= "
                            f"{shape.depth}; this pool is {self.shape}")
        depths = pool_depths(self.shape)
        # the builder's rerank order, per position: score desc, then depth asc, then pool order
        order = np.lexsort((np.broadcast_to(np.arange(depths.size), self.scores.shape),
                            np.broadcast_to(depths, self.scores.shape), -self.scores), axis=-1)
        bound = np.float32(shape.log_expand_min_prob)
        parent_score = np.take_along_axis(self.scores, np.maximum(self.parents, 0).astype(np.int64), -1)
        drafted = (depths <= shape.depth) & ((self.parents < 0) | (parent_score >= bound)) \
            & (self.scores >= np.float32(shape.log_verify_min_prob))
        drafted = np.take_along_axis(drafted, order, -1)
        node_depth = depths[order]
        verified = drafted & (np.cumsum(drafted, -1) <= shape.total_tokens)
        accepted = (verified & np.take_along_axis(self.matched, order, -1)).sum(-1)
        nodes = verified.sum(-1)
        tree_depth = np.where(verified, node_depth, 0).max(-1, initial=0)
        # eligible nodes per level (unsorted layout: level j is a fixed slice of the pool)
        per_level = np.stack([((depths == j) & (self.scores >= bound)).sum(-1)
                              for j in range(1, shape.depth)], -1) if shape.depth > 1 \
            else np.zeros((self.scores.shape[0], 0), dtype=np.int64)
        grown = per_level > 0
        levels = 1 + grown.sum(-1)
        rows = 1 + np.minimum(per_level, shape.top_k).sum(-1)
        work = StepWork(np.ones_like(nodes), levels, rows, nodes, (nodes > tree_depth).astype(np.int64))
        return accepted.astype(np.int16), work


def realize(pools: list[DraftPool], shape: TreeShape) -> tuple[np.ndarray, StepWork]:
    """`shape` at every position, from the shallowest pool that serves it."""
    serving = [p for p in pools if p.serves(shape)]
    if not serving:
        raise PoolError(f"shape {shape}: no recorded pool has width {shape.top_k} and depth >= "
                        f"{shape.depth}; pools: {[str(p.shape) for p in pools]}")
    return min(serving, key=lambda p: p.shape.depth).realize(shape)
