"""Tree verification: which draft nodes the target accepts, and the token it adds after them.

Greedy (temperature 0): the longest root path whose every token equals the target's argmax at
its parent; the bonus token is the argmax after the last accepted node.

Sampling (temperature > 0): recursive rejection over siblings. The draft tokens of a tree are
the draft model's top-k, i.e. chosen deterministically, so each candidate x is accepted with the
target's probability of x under the current residual distribution p; a rejected x is removed
from p (p[x] = 0, renormalised) before the next sibling is tried, and if every child is
rejected the bonus token is sampled from what is left. Each step is "sample from p, but look
at the candidates first": the output is distributed exactly as the target's (lossless), for any
draft. `tests/tree/test_verify.py` checks it with a chi-square test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_respsp.tree.build import DraftTree
from vllm_respsp_triton import accept_greedy as accept_greedy_kernel
from vllm_respsp_triton import build_tree_metadata
from vllm_respsp_triton.tree_metadata import TreeMetadata


@dataclass
class Acceptance:
    """Per request: accepted draft nodes (local indices, root first, padded with -1)."""

    accepted_len: torch.Tensor  # int32 [B], draft tokens accepted (root excluded)
    accepted_nodes: torch.Tensor  # int32 [B, max_depth + 1]
    bonus_token: torch.Tensor  # int64 [B]

    def output_tokens(self, tree: DraftTree) -> list[list[int]]:
        """The tokens each request emits this step: accepted draft tokens, then the bonus.
        One host copy for the batch: on a GPU, reading element by element waits for it each time."""
        nodes = self.accepted_nodes[:, 1:].long().clamp(min=0) + tree.cu_nodes[:-1, None].long().to(
            self.accepted_nodes.device)
        tokens = tree.tokens.to(nodes.device)[nodes]
        rows = torch.cat([self.accepted_len[:, None].long(), tokens.long(), self.bonus_token[:, None].long()], 1)
        return [row[1:1 + row[0]] + [row[-1]] for row in rows.tolist()]


def _metadata(tree: DraftTree):
    max_nodes = int((tree.cu_nodes[1:] - tree.cu_nodes[:-1]).max())
    return build_tree_metadata(tree.parents, tree.cu_nodes, max_nodes)


def accept_greedy(tree: DraftTree, target_argmax: torch.Tensor, metadata: TreeMetadata | None = None) -> Acceptance:
    """target_argmax [N]: the target's greedy token after each node. `metadata`: the trees'
    `build_tree_metadata`, when the caller has it already."""
    meta = metadata if metadata is not None else _metadata(tree)
    max_depth = int(tree.depths.max())
    length, nodes, bonus = accept_greedy_kernel(
        tree.tokens, target_argmax, meta.first_child, meta.next_sibling, tree.cu_nodes, max_depth)
    return Acceptance(length, nodes, bonus.long())


def remove_rejected(p: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> None:
    """The residual after a rejection: the rejected token gets no probability (in place)."""
    p[rows, tokens] = 0.0


def uniform(wanted: torch.Tensor, generator: torch.Generator | None,
            own: dict[int, torch.Generator]) -> torch.Tensor:
    """One U(0, 1) draw per request; a request with its own generator (a seeded request) draws
    from it, and only when it needs a draw (`wanted`), so its draws, and therefore its tokens,
    do not depend on the other requests in the batch."""
    u = torch.rand(wanted.numel(), generator=generator, dtype=torch.float32)
    for r, g in own.items():
        if bool(wanted[r]):
            u[r] = torch.rand((), generator=g, device=g.device, dtype=torch.float32).to(u.device)
    return u


SeededSampler = Callable[[torch.Tensor, torch.Generator], int]
"""Samples one token from an unnormalised distribution [V] with a request's own generator."""


def exponential_race(p: torch.Tensor, generator: torch.Generator) -> int:
    """vLLM's native seeded sampling: argmax of p / Exp(1) noise, one draw per vocabulary entry."""
    row = p.to(generator.device)
    noise = torch.empty_like(row).exponential_(generator=generator)
    return int((row / noise).argmax())


def sample_rows(p: torch.Tensor, generator: torch.Generator | None, own: dict[int, torch.Generator],
                seeded: SeededSampler = exponential_race) -> torch.Tensor:
    """One token per row of the (unnormalised) distributions p [B, V]. Rows of requests with
    their own generator sample with `seeded`, which the engine glue makes the same as vLLM's
    sampler on its platform: a seeded request's token then does not depend on whether vLLM's
    sampler or this one handled its step."""
    out = torch.multinomial(p / p.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)
    for r, g in own.items():
        out[r] = seeded(p[r], g)
    return out


def accept_sampled(tree: DraftTree, target_probs: torch.Tensor, generator: torch.Generator | None = None,
                   request_generators: dict[int, torch.Generator] | None = None,
                   seeded: SeededSampler = exponential_race, metadata: TreeMetadata | None = None) -> Acceptance:
    """target_probs [N, V]: the target's sampling distribution after each node (temperature,
    top-k/top-p already applied). Vectorised over requests; loops over depth and siblings.
    `request_generators` {request index: generator}: seeded requests (see `uniform`), whose
    bonus token `seeded` samples (see `sample_rows`)."""
    own = request_generators or {}
    meta = metadata if metadata is not None else _metadata(tree)
    num_requests = tree.num_requests
    start = tree.cu_nodes[:-1].long()
    max_depth = int(tree.depths.max())
    first_child, next_sibling = meta.first_child.long(), meta.next_sibling.long()
    rows = torch.arange(num_requests)

    accepted_nodes = torch.full((num_requests, max_depth + 1), -1, dtype=torch.int32)
    accepted_nodes[:, 0] = 0
    accepted_len = torch.zeros(num_requests, dtype=torch.int32)
    current = torch.zeros(num_requests, dtype=torch.long)  # local node index
    active = torch.ones(num_requests, dtype=torch.bool)
    p = target_probs[start].clone().float()
    for _ in range(max_depth):
        child = first_child[start + current]
        moved = torch.zeros(num_requests, dtype=torch.bool)
        while True:
            trying = active & ~moved & (child >= 0)
            if not bool(trying.any()):
                break
            token = tree.tokens[start + child.clamp(min=0)]
            # vLLM pads some requests' drafts with -1 placeholders: never accepted, and they
            # take neither a draw nor probability mass (as in vLLM's rejection sampler).
            placeholder = trying & (token < 0)
            trying &= ~placeholder
            u = uniform(trying, generator, own)
            mass = p.sum(-1)
            accept = trying & (u * mass < p[rows, token.clamp(min=0)])
            reject = trying & ~accept
            remove_rejected(p, rows[reject], token[reject])
            # Accepted: step into the child and restart from the target's distribution there.
            current = torch.where(accept, child, current)
            p[accept] = target_probs[start[accept] + child[accept]].float()
            accepted_len += accept.int()
            accepted_nodes[rows[accept], accepted_len[accept].long()] = child[accept].int()
            moved |= accept
            child = torch.where(reject | placeholder, next_sibling[start + child.clamp(min=0)], child)
        active &= moved
        if not bool(active.any()):
            break
    # Bonus: a sample from the residual at the last accepted node.
    bonus = sample_rows(p, generator, own, seeded)
    return Acceptance(accepted_len, accepted_nodes, bonus)
