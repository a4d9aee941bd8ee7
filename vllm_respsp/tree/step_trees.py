"""The trees verified in one engine step, laid over vLLM's flattened token rows.

vLLM schedules a request's tree like a chain of draft tokens: the root (last accepted token)
and then the nodes in breadth-first order, one row and one KV slot each, with sequential
positions. `StepTrees.build` recovers each request's tree from what the drafter proposed (a
scheduler that cut the drafts short keeps a breadth-first prefix, which is still a tree),
rewrites the RoPE positions of the rows to prefix length + depth, and records what the tree
attention, the tree sampler and the KV compaction need. Slot mappings were computed from the
sequential positions before the rewrite, so every node keeps its own slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_respsp_triton import build_tree_metadata
from vllm_respsp_triton.tree_metadata import TreeMetadata


@dataclass
class ProposedTree:
    """What the drafter proposed for one request: node tokens (root first) and parents."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    shape: str = ""


@dataclass
class StepTrees:
    batch_index: torch.Tensor  # int64 [R] input-batch index of each request with drafts
    row_start: torch.Tensor  # int64 [R] its first row (the root) in the step's token rows
    prefix_lens: torch.Tensor  # int32 [R] tokens before the root
    cu_nodes: torch.Tensor  # int32 [R + 1] nodes (root included) per request
    parents: torch.Tensor  # int32 [N] local parent index, -1 for the root
    depths: torch.Tensor  # int32 [N]
    tokens: torch.Tensor  # int64 [N]
    slots: torch.Tensor  # int64 [N] KV slot of each node
    is_chain: torch.Tensor  # bool [R]
    # Sub-batch of the requests that are not chains: their rows need tree attention.
    masked: torch.Tensor  # int64 [M] indices into the R requests
    masked_rows: torch.Tensor  # int64 [sum nodes] token rows of those requests' nodes
    masked_cu: torch.Tensor  # int32 [M + 1]
    masked_bits: torch.Tensor  # int32 [sum nodes, words] ancestor bitmask
    metadata: TreeMetadata  # of every tree of the step (host): children and siblings for verification

    @property
    def num_requests(self) -> int:
        return int(self.batch_index.numel())

    def nodes(self, r: int) -> slice:
        return slice(int(self.cu_nodes[r]), int(self.cu_nodes[r + 1]))

    @classmethod
    def build(cls, req_ids: list[str], spec_tokens: dict[str, list[int]],
              proposed: dict[str, ProposedTree], query_start: np.ndarray,
              num_computed: np.ndarray, slot_mapping: torch.Tensor) -> StepTrees | None:
        batch, starts, prefixes, sizes = [], [], [], []
        parents, depths, tokens, chains = [], [], [], []
        for i, req_id in enumerate(req_ids):
            drafts = spec_tokens.get(req_id)
            if not drafts:
                continue
            n = len(drafts) + 1
            tree = proposed.get(req_id)
            if tree is not None and tree.tokens[1:n] == list(drafts) and len(tree.tokens) >= n:
                par, dep = tree.parents[:n], tree.depths[:n]
            else:  # not ours (e.g. vLLM's placeholder drafts): verify as a chain
                par, dep = list(range(-1, n - 1)), list(range(n))
            batch.append(i)
            starts.append(int(query_start[i]))
            prefixes.append(int(num_computed[i]))
            sizes.append(n)
            parents += par
            depths += dep
            tokens += [-1] + list(drafts)  # the root's token is not needed here
            chains.append(dep[-1] == n - 1)
        if all(chains):  # chains only: vLLM's own positions, attention and rejection sampler
            return None
        cu = np.zeros(len(sizes) + 1, dtype=np.int64)
        cu[1:] = np.cumsum(sizes)
        row_start = torch.tensor(starts, dtype=torch.long)
        local = torch.arange(int(cu[-1])) - torch.from_numpy(np.repeat(cu[:-1], sizes))
        rows = torch.from_numpy(np.repeat(starts, sizes)) + local
        is_chain = torch.tensor(chains)
        masked = (~is_chain).nonzero().squeeze(1)
        masked_sizes = [sizes[m] for m in masked.tolist()]
        node_masked = torch.from_numpy(np.repeat(~np.array(chains), sizes))
        masked_cu = torch.zeros(len(masked_sizes) + 1, dtype=torch.int32)
        masked_cu[1:] = torch.tensor(masked_sizes, dtype=torch.int32).cumsum(0)
        parents_t = torch.tensor(parents, dtype=torch.int32)
        cu_nodes = torch.from_numpy(cu).int()
        # once per step, for the tree attention (ancestor bits) and the verification (children)
        metadata = build_tree_metadata(parents_t, cu_nodes, max(sizes))
        device = slot_mapping.device
        return cls(
            batch_index=torch.tensor(batch, dtype=torch.long),
            row_start=row_start,
            prefix_lens=torch.tensor(prefixes, dtype=torch.int32),
            cu_nodes=cu_nodes,
            parents=parents_t,
            depths=torch.tensor(depths, dtype=torch.int32),
            tokens=torch.tensor(tokens, dtype=torch.long),
            slots=slot_mapping[rows.to(device)].long().cpu(),
            is_chain=is_chain,
            masked=masked,
            masked_rows=rows[node_masked].to(device),
            masked_cu=masked_cu.to(device),
            masked_bits=metadata.ancestor_bits[node_masked].to(device),
            metadata=metadata,
        )

    def rewrite_positions(self, positions: torch.Tensor) -> None:
        """RoPE position of every node = its request's prefix length + its depth (in place)."""
        sizes = (self.cu_nodes[1:] - self.cu_nodes[:-1]).long()
        local = torch.arange(int(self.cu_nodes[-1])) - torch.repeat_interleave(self.cu_nodes[:-1].long(), sizes)
        rows = torch.repeat_interleave(self.row_start, sizes) + local
        new = torch.repeat_interleave(self.prefix_lens.long(), sizes) + self.depths.long()
        positions[rows.to(positions.device)] = new.to(positions.device, positions.dtype)
