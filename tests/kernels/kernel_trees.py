"""Random draft trees, batch packing and brute-force pure-Python oracles."""

from __future__ import annotations

import random

import torch


def random_tree(n: int, rng: random.Random, bfs: bool = False) -> list[int]:
    """Parents of an n-node tree with uniformly random ``parent < i``.

    With ``bfs=True`` the nodes are relabelled into breadth-first order.
    """
    parents = [-1] + [rng.randrange(i) for i in range(1, n)]
    return bfs_relabel(parents) if bfs else parents


def bfs_relabel(parents: list[int]) -> list[int]:
    children = [[] for _ in parents]
    for i, p in enumerate(parents[1:], 1):
        children[p].append(i)
    order, new_index = [0], {0: 0}
    for node in order:
        for c in children[node]:
            new_index[c] = len(order)
            order.append(c)
    return [-1] + [new_index[parents[old]] for old in order[1:]]


def chain_tree(n: int) -> list[int]:
    return [-1] + list(range(n - 1))


def eagle_tree(depth: int, topk: int, draft_nodes: int, rng: random.Random) -> list[int]:
    """Beam-like EAGLE tree in BFS order: each level expands up to ``topk``
    children under a few of the previous level's nodes."""
    parents, frontier = [-1], [0]
    for level in range(depth):
        budget = draft_nodes - (len(parents) - 1)
        levels_left = depth - level
        width = max(1, min(budget - (levels_left - 1), budget // levels_left + rng.randrange(3)))
        new = []
        for p in frontier:
            take = min(topk, width - len(new))
            for _ in range(take):
                new.append(len(parents))
                parents.append(p)
            if len(new) >= width:
                break
        if not new:
            break
        frontier = rng.sample(new, min(len(new), max(1, topk // 4)))
        frontier.sort()
    return parents


def big_tree(rng: random.Random) -> list[int]:
    """128 draft nodes + root, depth 8, two nodes with 32 children each."""
    parents = [-1] + [0] * 32 + [1] * 32  # levels 1 and 2: fan-out 32
    prev = list(range(33, 65))
    for level_size in (11, 11, 11, 11, 10, 10):  # levels 3..8
        first = len(parents)
        parents += sorted(rng.choice(prev) for _ in range(level_size))
        prev = list(range(first, len(parents)))
    assert len(parents) == 129
    return parents


def pack(trees: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(parents int32 [total], cu_nodes int32 [B+1]) of a batch of trees."""
    cu = [0]
    for t in trees:
        cu.append(cu[-1] + len(t))
    flat = [p for t in trees for p in t]
    return torch.tensor(flat, dtype=torch.int32), torch.tensor(cu, dtype=torch.int32)


# ---- brute-force oracles ----------------------------------------------------


def ancestors(parents: list[int], i: int) -> list[int]:
    """Node i and its ancestors, by walking parent links."""
    out = []
    while i >= 0:
        out.append(i)
        i = parents[i]
    return out


def children_of(parents: list[int]) -> list[list[int]]:
    kids = [[] for _ in parents]
    for i, p in enumerate(parents):
        if p >= 0:
            kids[p].append(i)
    return kids


def greedy_walk(parents, draft, target, max_depth):
    """(accepted path incl. root, bonus token) of one tree, in plain Python."""
    kids = children_of(parents)
    path = [0]
    while len(path) <= max_depth:
        here = path[-1]
        match = [c for c in kids[here] if draft[c] == target[here]]
        if not match:
            break
        path.append(match[0])
    return path, target[path[-1]]


def sample_batch(rng: random.Random, num_requests: int, max_nodes: int) -> list[list[int]]:
    """A ragged mix: root-only requests, chains, random and EAGLE-like trees."""
    trees = []
    for _ in range(num_requests):
        kind = rng.randrange(4)
        n = rng.randint(1, max_nodes)
        if kind == 0:
            trees.append([-1])
        elif kind == 1:
            trees.append(chain_tree(n))
        elif kind == 2:
            trees.append(random_tree(n, rng, bfs=rng.random() < 0.5))
        else:
            trees.append(eagle_tree(rng.randint(1, 6), rng.randint(1, 8), max(1, n - 1), rng))
    return trees
