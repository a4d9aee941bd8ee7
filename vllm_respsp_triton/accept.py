"""Greedy acceptance of a draft tree against the target's argmax tokens.

Batch layout and local indexing: see :mod:`vllm_respsp_triton.tree_metadata`.
Starting at the root, repeatedly descend into the first child (in
``first_child`` -> ``next_sibling`` order) whose draft token equals the
target's greedy prediction at the current node; stop when no child matches
or ``max_depth`` non-root nodes are accepted.
"""

from __future__ import annotations

import torch

from ._dispatch import tl, triton, use_triton


def accept_greedy_ref(
    draft_tokens: torch.Tensor,
    target_argmax: torch.Tensor,
    first_child: torch.Tensor,
    next_sibling: torch.Tensor,
    cu_nodes: torch.Tensor,
    max_depth: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for :func:`accept_greedy`; same signature and outputs.

    All requests descend in lockstep, one tree level per outer iteration; the
    inner loop advances every still-searching request one sibling further.
    """
    device = draft_tokens.device
    num_requests = cu_nodes.numel() - 1
    root_row = cu_nodes[:-1].long()
    first_child = first_child.long()
    next_sibling = next_sibling.long()

    current = torch.zeros(num_requests, dtype=torch.long, device=device)
    alive = torch.ones(num_requests, dtype=torch.bool, device=device)
    accepted_nodes = torch.full((num_requests, max_depth + 1), -1, dtype=torch.int32, device=device)
    accepted_nodes[:, 0] = 0
    for depth in range(1, max_depth + 1):
        wanted = target_argmax[root_row + current]
        child = torch.where(alive, first_child[root_row + current], -1)
        match = torch.full_like(child, -1)
        while bool((child >= 0).any()):
            searching = child >= 0
            row = root_row + child.clamp(min=0)
            hit = searching & (draft_tokens[row] == wanted)
            match = torch.where(hit, child, match)
            child = torch.where(searching & ~hit, next_sibling[row], -1)
        alive = match >= 0
        if not bool(alive.any()):
            break
        current = torch.where(alive, match, current)
        accepted_nodes[:, depth] = match.to(torch.int32)
    accepted_len = (accepted_nodes[:, 1:] >= 0).sum(dim=1).to(torch.int32)
    bonus_token = target_argmax[root_row + current]
    return accepted_len, accepted_nodes, bonus_token


@triton.jit
def _accept_greedy_kernel(
    draft_tokens_ptr,
    target_argmax_ptr,
    first_child_ptr,
    next_sibling_ptr,
    cu_nodes_ptr,
    accepted_len_ptr,
    accepted_nodes_ptr,
    bonus_token_ptr,
    max_depth,
):
    # One program walks one request's tree.  The walk is a chain of dependent
    # scalar loads (child -> sibling -> ...); trees are small, so latency, not
    # bandwidth, bounds it, and one launch for the batch is what matters.
    request = tl.program_id(0)
    start = tl.load(cu_nodes_ptr + request)
    out_row = accepted_nodes_ptr + request * (max_depth + 1)
    tl.store(out_row, 0)

    current = start * 0  # int32 scalars; arithmetic keeps loop-carried types fixed
    alive = current == 0
    n_accepted = current
    for depth in range(1, max_depth + 1):
        wanted = tl.load(target_argmax_ptr + start + current)
        child = tl.where(alive, tl.load(first_child_ptr + start + current), -1)
        match = child * 0 - 1
        while child >= 0:
            hit = tl.load(draft_tokens_ptr + start + child) == wanted
            match = tl.where(hit, child, match)
            child = tl.where(hit, -1, tl.load(next_sibling_ptr + start + child))
        tl.store(out_row + depth, match)
        alive = match >= 0
        current = tl.where(alive, match, current)
        n_accepted += alive.to(tl.int32)
    tl.store(accepted_len_ptr + request, n_accepted)
    tl.store(bonus_token_ptr + request, tl.load(target_argmax_ptr + start + current))


def accept_greedy(
    draft_tokens: torch.Tensor,
    target_argmax: torch.Tensor,
    first_child: torch.Tensor,
    next_sibling: torch.Tensor,
    cu_nodes: torch.Tensor,
    max_depth: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Longest greedily-verified root-to-node path of every request's tree.

    Args:
        draft_tokens: int [total_nodes], token of each node (the root's is the
            last accepted token; it is never compared).
        target_argmax: int [total_nodes], the target's greedy next token after
            each node (its prediction at that tree position).
        first_child, next_sibling: int32 [total_nodes], LOCAL, from
            :func:`build_tree_metadata`.
        cu_nodes: int32 [B+1], every request has >= 1 node.
        max_depth: most non-root nodes to accept (tree depth bound).
    Returns:
        accepted_len: int32 [B], accepted non-root nodes.
        accepted_nodes: int32 [B, max_depth+1], local indices of the accepted
            path starting with the root (0), padded with -1.
        bonus_token: [B], dtype of ``target_argmax``: target_argmax at the
            last accepted node.
    One launch, one program per request.
    """
    if not use_triton(draft_tokens):
        return accept_greedy_ref(
            draft_tokens, target_argmax, first_child, next_sibling, cu_nodes, max_depth
        )
    num_requests = cu_nodes.numel() - 1
    device = draft_tokens.device
    accepted_len = torch.empty(num_requests, dtype=torch.int32, device=device)
    accepted_nodes = torch.empty(num_requests, max_depth + 1, dtype=torch.int32, device=device)
    bonus_token = torch.empty(num_requests, dtype=target_argmax.dtype, device=device)
    if num_requests:
        _accept_greedy_kernel[(num_requests,)](
            draft_tokens.contiguous(),
            target_argmax.contiguous(),
            first_child.to(torch.int32).contiguous(),
            next_sibling.to(torch.int32).contiguous(),
            cu_nodes.to(torch.int32).contiguous(),
            accepted_len,
            accepted_nodes,
            bonus_token,
            max_depth,
        )
    return accepted_len, accepted_nodes, bonus_token
