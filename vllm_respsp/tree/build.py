"""EAGLE-3 draft-tree construction for a batch whose requests have different shapes.

The builder is model-agnostic: it asks a `draft_fn` for the draft model's log-probabilities at
every frontier node of every request that still grows, one call per level for the whole batch
(ragged, never one request at a time), and keeps the beam and the candidate pool per request.

Per request b with shape (T_b, D_b, K_b):
    level 1        the root's top K_b tokens; they are the first frontier
    level 2..D_b   each frontier node proposes its top K_b children, scored by cumulative
                   log-prob; the best K_b of those K_b^2 become the next frontier
    rerank         the best T_b of all candidates (ties: shallower first). A child never
                   scores above its parent, so the kept set is a tree rooted at the root.
A confidence-bounded shape (min_prob > 0, see shape.py) expands only the frontier nodes scoring
at or above log(min_prob). Its candidates are then exactly the unbounded beam's candidates of
level 1 and those whose parent reaches the bound (a pruned node's children score below the
bound, so they never displace one of those from the beam), which lets `policy.pools` derive
bounded trees from recordings of unbounded beams. A shape's `verify_min_prob` bound keeps only
the candidates scoring at or above it out of the rerank (their parents score higher: still a
tree, possibly the root alone) and expands no node below it.
The result is a `DraftTree`: nodes in breadth-first order (root first), so any prefix of a
request's nodes is itself a tree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from vllm_respsp.tree.shape import TreeShape

NEG_INF = float("-inf")


@dataclass
class DraftTree:
    """A batch of draft trees, flattened request by request; node 0 of a request is its root.

    tokens   int64 [N]  token of each node (the root's is the last accepted token)
    parents  int32 [N]  local index of the parent, -1 for the root
    depths   int32 [N]  0 for the root; RoPE position = prefix length + depth
    scores   float [N]  cumulative draft log-probability (0 for the root)
    cu_nodes int32 [B+1]
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    scores: torch.Tensor
    cu_nodes: torch.Tensor

    @property
    def num_requests(self) -> int:
        return self.cu_nodes.numel() - 1

    def request(self, b: int) -> DraftTree:
        s, e = int(self.cu_nodes[b]), int(self.cu_nodes[b + 1])
        return DraftTree(self.tokens[s:e], self.parents[s:e], self.depths[s:e], self.scores[s:e],
                         torch.tensor([0, e - s], dtype=torch.int32))

    def paths(self, b: int) -> list[tuple[int, ...]]:
        """Token paths (root excluded) of request b's nodes, in node order (for tests/debug)."""
        tree = self.request(b)
        out: list[tuple[int, ...]] = []
        for i in range(tree.tokens.numel()):
            p = int(tree.parents[i])
            out.append(() if p < 0 else out[p] + (int(tree.tokens[i]),))
        return out


@dataclass
class Frontier:
    """The nodes whose children the draft model must score next (one row each).

    request     int64 [F]  batch index of the node's request
    candidate   int64 [F]  the node's id in the builder's candidate pool (see TreeBuilder)
    token       int64 [F]
    depth       int        level of these nodes (1 = children of the root)
    """

    request: torch.Tensor
    candidate: torch.Tensor
    token: torch.Tensor
    depth: int


class TreeBuilder:
    """Grows one batch of trees level by level; see the module docstring.

    Candidate pool: every candidate node of every request, appended level by level, with its
    token, parent candidate id (-1 = root), depth, cumulative score and request.
    """

    def __init__(self, shapes: list[TreeShape], root_tokens: torch.Tensor):
        self.shapes = shapes
        device = root_tokens.device
        self.device = device
        self.root_tokens = root_tokens.long()
        self.top_k = torch.tensor([s.top_k for s in shapes], device=device)
        self.depth = torch.tensor([s.depth for s in shapes], device=device)
        self.bounded = any(s.bounded for s in shapes)
        self.depths_range = (min(s.depth for s in shapes), max(s.depth for s in shapes))
        # float32, as policy.pools compares recorded float32 scores: both sides round alike
        self.log_min = torch.tensor([s.log_expand_min_prob for s in shapes], dtype=torch.float32, device=device)
        self.log_verify = torch.tensor([s.log_verify_min_prob for s in shapes], dtype=torch.float32, device=device) \
            if any(s.verify_min_prob for s in shapes) else None
        self.k_max = max(s.top_k for s in shapes)
        self.uniform_width = all(s.top_k == self.k_max for s in shapes)
        self.tokens: list[torch.Tensor] = []
        self.parents: list[torch.Tensor] = []
        self.depths: list[torch.Tensor] = []
        self.scores: list[torch.Tensor] = []
        self.requests: list[torch.Tensor] = []
        self.num_candidates = 0

    def _add(self, request, token, parent, depth: int, score) -> torch.Tensor:
        ids = torch.arange(self.num_candidates, self.num_candidates + token.numel(), device=self.device)
        self.num_candidates += token.numel()
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(torch.full_like(token, depth))
        self.scores.append(score)
        self.requests.append(request)
        return ids

    def _top_children(self, logprobs: torch.Tensor, width: torch.Tensor):
        """Top-`k_max` children per row, with columns >= that row's width masked to -inf
        (`keep`); keep is None when every request takes k_max children (known on the host)."""
        values, tokens = logprobs.topk(self.k_max, dim=-1)
        if self.uniform_width:
            return values, tokens, None
        keep = torch.arange(self.k_max, device=self.device)[None, :] < width[:, None]
        return values.masked_fill(~keep, NEG_INF), tokens, keep

    @staticmethod
    def _kept(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """The kept entries of a [rows, k_max] tensor, row-major. Without a mask this is a
        reshape: a boolean mask's output size is read back from a GPU, a reshape's is known."""
        return x.reshape(-1).contiguous() if keep is None else x[keep]  # (an expanded row's view has stride 0)

    def root_level(self, root_logprobs: torch.Tensor) -> Frontier:
        """Level 1 from the draft model's log-probs at each root ([B, V])."""
        values, tokens, keep = self._top_children(root_logprobs, self.top_k)
        request = torch.arange(len(self.shapes), device=self.device)[:, None].expand_as(tokens)
        request, tokens, values = (self._kept(t, keep) for t in (request, tokens, values))
        ids = self._add(request, tokens, torch.full_like(tokens, -1), 1, values)
        return Frontier(request, ids, tokens, 1)

    def growing(self, frontier: Frontier) -> Frontier | None:
        """The frontier nodes to expand: their requests want another level and they score at
        or above their request's bound (None when no node is left)."""
        if not self.bounded:  # then who grows is known on the host: no read of the scores
            shallowest, deepest = self.depths_range
            if frontier.request.numel() == 0 or frontier.depth >= deepest:
                return None
            if frontier.depth < shallowest:
                return frontier
        grows = self.depth[frontier.request] > frontier.depth
        score = torch.cat(self.scores)[frontier.candidate]
        grows &= score.float() >= self.log_min[frontier.request]
        if not bool(grows.any()):
            return None
        return Frontier(frontier.request[grows], frontier.candidate[grows], frontier.token[grows],
                        frontier.depth)

    def next_level(self, frontier: Frontier, logprobs: torch.Tensor) -> Frontier:
        """Children of a `growing` frontier from the draft log-probs at its nodes ([F, V])."""
        depth = frontier.depth + 1
        request, parent = frontier.request, frontier.candidate
        parent_score = torch.cat(self.scores)[parent]
        width = self.top_k[request]
        values, tokens, keep = self._top_children(logprobs, width)
        child_score = parent_score[:, None] + values
        ids = self._add(self._kept(request[:, None].expand_as(tokens), keep), self._kept(tokens, keep),
                        self._kept(parent[:, None].expand_as(tokens), keep), depth, self._kept(child_score, keep))
        if self.k_max == 1:  # chains only: each node's one child is its request's whole beam
            # (every top_k is 1, so nothing was masked: a top-1 log-prob is never -inf)
            return Frontier(request, ids, tokens.reshape(-1), depth)
        # Beam: per request, the best K_b of its K_b^2 children. Lay the children out in one
        # padded row per request ([R, k_max * k_max]) and take the top of each row.
        reqs, slot_of_parent = torch.unique_consecutive(request, return_inverse=True)
        first = torch.searchsorted(request, reqs)
        rank_in_request = torch.arange(request.numel(), device=self.device) - first[slot_of_parent]
        if keep is None:
            child_ids = ids.view(request.numel(), self.k_max)
        else:
            child_ids = torch.full((request.numel(), self.k_max), -1, device=self.device)
            child_ids[keep] = ids
        grid_scores = torch.full((reqs.numel(), self.k_max * self.k_max), NEG_INF,
                                 dtype=child_score.dtype, device=self.device)
        grid_ids = torch.full_like(grid_scores, -1, dtype=torch.long)
        col = rank_in_request[:, None] * self.k_max + torch.arange(self.k_max, device=self.device)
        grid_scores[slot_of_parent[:, None].expand_as(col), col] = child_score
        grid_ids[slot_of_parent[:, None].expand_as(col), col] = child_ids
        best_scores, best_cols = grid_scores.topk(self.k_max, dim=-1)
        best_ids = grid_ids.gather(1, best_cols)
        keep_best = (torch.arange(self.k_max, device=self.device)[None, :] < self.top_k[reqs][:, None]) \
            & (best_scores > NEG_INF)
        new_ids = best_ids[keep_best]
        return Frontier(reqs[:, None].expand_as(best_ids)[keep_best], new_ids,
                        torch.cat(self.tokens)[new_ids], depth)

    def finish(self) -> DraftTree:
        """Rerank every request's candidates, keep its best T_b, order them breadth-first."""
        if self._plain_chains():
            return self._chains()
        return self._reranked()

    def _plain_chains(self) -> bool:
        """Every request drafts a whole chain of one depth: its candidates are its tree, level
        by level, and no rerank is needed (known on the host)."""
        shallowest, deepest = self.depths_range
        return self.k_max == 1 and not self.bounded and shallowest == deepest \
            and all(s.total_tokens == s.depth for s in self.shapes)

    def _chains(self) -> DraftTree:
        """`_reranked`'s result for `_plain_chains` steps, from the levels as they are: the
        candidates of level l are one per request, in request order."""
        num_requests, nodes = len(self.shapes), self.depths_range[0] + 1
        tokens = torch.cat([self.root_tokens[:, None], torch.stack(self.tokens, dim=1)], dim=1)
        scores = torch.stack(self.scores, dim=1)
        scores = torch.cat([scores.new_zeros(num_requests, 1), scores], dim=1)
        levels = torch.arange(nodes, dtype=torch.int32, device=self.device)
        cu = torch.arange(num_requests + 1, dtype=torch.int32, device=self.device) * nodes
        return DraftTree(tokens.reshape(-1), (levels - 1).repeat(num_requests), levels.repeat(num_requests),
                         scores.reshape(-1), cu)

    def _reranked(self) -> DraftTree:
        tokens, parents, depths = torch.cat(self.tokens), torch.cat(self.parents), torch.cat(self.depths)
        scores, requests = torch.cat(self.scores), torch.cat(self.requests)
        # Order: request, then score descending, ties shallower first (stable sorts, last key first).
        order = torch.argsort(depths, stable=True)
        order = order[torch.argsort(-scores[order], stable=True)]
        order = order[torch.argsort(requests[order], stable=True)]
        kept, num_kept = self._best_per_request(order, requests, scores)
        # Breadth-first: by request, then depth, then score rank (argsort keeps it stable).
        kept = kept[torch.argsort(depths[kept], stable=True)]
        kept = kept[torch.argsort(requests[kept], stable=True)]
        return self._assemble(kept, num_kept, tokens, parents, depths, scores)

    def _best_per_request(self, order: torch.Tensor, requests: torch.Tensor, scores: torch.Tensor):
        """(kept, num_kept): each request's best T_b candidates out of `order` (sorted by request,
        best first) that reach its verify bound, and how many per request."""
        known = self._candidates_per_request()
        if known is not None:  # positions and counts known on the host
            counts = np.array(known)
            take = np.minimum(counts, [s.total_tokens for s in self.shapes])
            first = np.repeat(np.cumsum(counts) - counts, take)
            rank = np.arange(int(take.sum())) - np.repeat(np.cumsum(take) - take, take)
            return order[torch.from_numpy(first + rank).to(self.device)], torch.from_numpy(take).to(self.device)
        total = torch.tensor([s.total_tokens for s in self.shapes], device=self.device)
        counts = torch.bincount(requests, minlength=len(self.shapes))
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=self.device) - starts[requests[order]]
        keep = rank < total[requests[order]]
        if self.log_verify is not None:  # sorted by score: the bound cuts the tail of each request
            keep &= scores[order].float() >= self.log_verify[requests[order]]
        kept = order[keep]
        return kept, torch.bincount(requests[kept], minlength=len(self.shapes))

    def _candidates_per_request(self) -> list[int] | None:
        """Candidates per request when the host knows them without reading the device: with no
        confidence bound every request grows to its depth, K children at level 1 and its K
        beams' K children (K^2) at every level below. None with a bound (scores decide)."""
        if self.bounded:
            return None
        return [s.top_k + (s.depth - 1) * s.top_k * s.top_k for s in self.shapes]

    def _assemble(self, kept, num_kept, tokens, parents, depths, scores) -> DraftTree:
        """Lay the kept candidates (sorted by request, breadth-first) out after each root."""
        num_requests = len(self.shapes)
        arange = torch.arange(num_requests, device=self.device)
        cu = torch.zeros(num_requests + 1, dtype=torch.long, device=self.device)
        cu[1:] = torch.cumsum(num_kept + 1, 0)
        req_of_kept = torch.repeat_interleave(arange, num_kept, output_size=kept.numel())
        kept_start = torch.cumsum(num_kept, 0) - num_kept
        local = torch.arange(kept.numel(), device=self.device) - kept_start[req_of_kept] + 1
        rows = cu[:-1][req_of_kept] + local
        local_of_candidate = torch.full((tokens.numel(),), -1, dtype=torch.long, device=self.device)
        local_of_candidate[kept] = local
        parent_candidate = parents[kept]
        parent_local = torch.where(parent_candidate >= 0,
                                   local_of_candidate[parent_candidate.clamp(min=0)], 0)
        if bool((parent_local < 0).any()):
            raise AssertionError("rerank kept a node without its parent")

        n = kept.numel() + num_requests
        out_tokens = torch.empty(n, dtype=torch.long, device=self.device)
        out_parents = torch.full((n,), -1, dtype=torch.int32, device=self.device)
        out_depths = torch.zeros(n, dtype=torch.int32, device=self.device)
        out_scores = torch.zeros(n, dtype=scores.dtype, device=self.device)
        out_tokens[cu[:-1]] = self.root_tokens
        out_tokens[rows] = tokens[kept]
        out_parents[rows] = parent_local.int()
        out_depths[rows] = depths[kept].int()
        out_scores[rows] = scores[kept]
        return DraftTree(out_tokens, out_parents, out_depths, out_scores, cu.int())


def build_trees(
    shapes: list[TreeShape],
    root_tokens: torch.Tensor,
    root_logprobs: torch.Tensor,
    draft_fn: Callable[[Frontier, TreeBuilder], torch.Tensor],
) -> DraftTree:
    """Build every request's tree: one `draft_fn` call per level for the whole batch.

    draft_fn(frontier, builder) -> log-probs [len(frontier.token), V] of the draft model at
    each frontier node (the builder's candidate pool gives each node's parent chain).
    """
    builder = TreeBuilder(shapes, root_tokens)
    frontier = builder.growing(builder.root_level(root_logprobs))
    while frontier is not None:
        frontier = builder.growing(builder.next_level(frontier, draft_fn(frontier, builder)))
    return builder.finish()
