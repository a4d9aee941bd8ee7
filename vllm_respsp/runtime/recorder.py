"""Trace recording inside the engine (design.md §6): what every action's tree would have been.

With `VLLM_RESPSP_RECORD=<file>` set, the respsp runtime proposes no drafts at all, so the
engine decodes exactly as without speculation, one token per step. At every step it still runs
its drafter as usual and, for every request, grows the tree of *each* action of the config's
action set from the same root states, and appends one record per step to the file:

    {"req_ids": [...], "prompts": {req_id: prompt token ids (first record of a request only)},
     "root_positions": [...], "root_tokens": [...], "features": float32 [R, F],
     "feature_names": [...], "actions": [shape strings],
     "trees": (tokens, parents, depths, cu_nodes) for R x A trees, request-major}

Only after generation are the target's tokens after each root known; `policy.record` walks the
recorded trees along them to get each action's accepted length. The drafting code is the
serving code, so the features and trees are those a policy meets at serving time.
"""

from __future__ import annotations

import pickle

import torch

from vllm_respsp.policy.features import RootStates, feature_spec, policy_features
from vllm_respsp.tree.shape import TreeShape

RECORD_ENV = "VLLM_RESPSP_RECORD"
RECORDED_FEATURES = ("draft_root_hidden", "eagle3_fused", "draft_root_probs")


class TraceRecorder:
    def __init__(self, path: str, actions: list[TreeShape]):
        self.path = path
        self.actions = [a for a in actions if a.drafts]  # NO_DRAFTS accepts 0 by definition
        self.seen: set[str] = set()
        open(path, "wb").close()  # one recording per engine

    def record(self, drafter, req_ids: list[str], prompts: list[list[int]], root_tokens: list[int],
               root_positions: list[int], roots: RootStates) -> None:
        spec = feature_spec(RECORDED_FEATURES, int(roots.hidden.shape[-1]))
        features = policy_features(spec, roots)
        A = len(self.actions)
        rows = torch.arange(len(req_ids)).repeat_interleave(A)
        tree = drafter.draft([req_ids[i] for i in rows.tolist()], self.actions * len(req_ids),
                             torch.tensor(root_tokens)[rows], roots.hidden[rows], roots.logprobs[rows])
        new = {r: list(p) for r, p in zip(req_ids, prompts) if r not in self.seen}
        self.seen.update(new)
        record = {"req_ids": list(req_ids), "prompts": new, "root_positions": list(root_positions),
                  "root_tokens": list(root_tokens), "features": features.numpy(),
                  "feature_names": [f.name for f in spec], "actions": [str(a) for a in self.actions],
                  "trees": tuple(t.numpy() for t in (tree.tokens, tree.parents, tree.depths, tree.cu_nodes))}
        with open(self.path, "ab") as f:
            pickle.dump(record, f)

    def forget(self, keep: set[str]) -> None:
        self.seen &= keep


def read_records(path: str):
    with open(path, "rb") as f:
        while True:
            try:
                yield pickle.load(f)
            except EOFError:
                return
