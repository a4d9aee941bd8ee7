"""Trace recording inside the engine (design.md §6): what every action's tree would have been.

With `VLLM_RESPSP_RECORD=<file>` set, the respsp runtime proposes no drafts at all, so the
engine decodes exactly as without speculation, one token per step. At every step it still runs
its drafter as usual and, for every request, grows from the same root states one *pool* per
beam width of the config's shapes: the whole unbounded beam of that width, as deep as the
deepest shape of that width (`policy.pools`), and appends one record per step to the file:

    {"req_ids": [...], "prompts": {req_id: prompt token ids (first record of a request only)},
     "root_positions": [...], "root_tokens": [...], "features": float32 [R, F],
     "feature_names": [...], "pools": [pool shape strings],
     "trees": (tokens, parents, depths, scores, cu_nodes) for R x pools trees, request-major}

Only after generation are the target's tokens after each root known; `engine_tools.record` walks the
recorded pools along them, and every shape of those widths, bounded or not, is derived from
them. The drafting code is the serving code, so the features and trees are those a policy meets
at serving time.
"""

from __future__ import annotations

import pickle

import torch

from vllm_respsp.policy.features import RootStates, feature_spec, policy_features
from vllm_respsp.policy.pools import pool_shape
from vllm_respsp.tree.shape import TreeShape

RECORDED_FEATURES = ("draft_root_hidden", "eagle3_fused", "draft_root_probs")


class TraceRecorder:
    def __init__(self, path: str, shapes: list[TreeShape]):
        self.path = path
        depth = {}  # width -> deepest shape of that width (NO_DRAFTS accepts 0 by definition)
        for s in shapes:
            if s.drafts:
                depth[s.top_k] = max(depth.get(s.top_k, 0), s.depth)
        self.pools = [pool_shape(d, k) for k, d in sorted(depth.items())]
        self.seen: set[str] = set()
        open(path, "wb").close()  # one recording per engine

    def record(self, drafter, req_ids: list[str], prompts: list[list[int]], root_tokens: list[int],
               root_positions: list[int], roots: RootStates, padded=None) -> None:
        spec = feature_spec(RECORDED_FEATURES, int(roots.hidden.shape[-1]))
        features = policy_features(spec, roots)
        rows = torch.arange(len(req_ids)).repeat_interleave(len(self.pools))
        tree = drafter.draft([req_ids[i] for i in rows.tolist()], self.pools * len(req_ids),
                             torch.tensor(root_tokens)[rows], roots.hidden[rows], roots.logprobs[rows], padded)
        new = {r: list(p) for r, p in zip(req_ids, prompts) if r not in self.seen}
        self.seen.update(new)
        record = {"req_ids": list(req_ids), "prompts": new, "root_positions": list(root_positions),
                  "root_tokens": list(root_tokens), "features": features.numpy(),
                  "feature_names": [f.name for f in spec], "pools": [str(p) for p in self.pools],
                  "trees": tuple(t.numpy() for t in (tree.tokens, tree.parents, tree.depths,
                                                     tree.scores.float(), tree.cu_nodes))}
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
