"""The in-engine shape policy: one batched forward per engine step for every running request.

    policy = ShapePolicy.from_file(config.policy, config, hidden_size=..., feature_dims=...)
    shapes = policy.choose(request_ids, features [B, F], recent_accept [B], batch_load)

- Deterministic: argmax of the network's scores; for a bandit whose file carries its score
  units, the argmax under one shared number of draft passes for the batch (policy/coordinate.py).
- Persistence: a request keeps its chosen action for `hold` steps (from the policy file); only
  requests whose hold ran out go through the network, still in one batched call.
- Load gate: above the file's `max_draft_load` every request gets NO_DRAFTS without the network
  (simulator.draft_load_limit); the runtime asks `drafts_at(load)` before the head runs, so such
  a step does no draft work at all.
- Never raises at run time: an exception, a wrong feature width or a non-finite score sends the
  affected requests to the static fallback shape (the respsp config's `shape`), counts them in
  `fallback_count`, and does not hold the fallback (the next step asks the network again).
  Errors in the policy *file* are raised at load time instead (policy_file.load_policy).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from vllm_respsp.policy.coordinate import Coordination, action_levels, coordinated_choice
from vllm_respsp.policy.network import PolicyNet
from vllm_respsp.policy.policy_file import LoadShape, load_policy
from vllm_respsp.policy.simulator import drafts_at
from vllm_respsp.tree.shape import DEFAULT_SHAPE, NO_DRAFTS, TreeShape

logger = logging.getLogger(__name__)
FALLBACK = -1  # action index meaning "use the static fallback shape"


class ShapePolicy(nn.Module):
    def __init__(self, net: PolicyNet, actions: list[TreeShape], fallback: TreeShape, hold: int = 1,
                 feature_spec: list | None = None, coordination: Coordination | None = None,
                 max_draft_load: int | None = None, static_loads: tuple[LoadShape, ...] = ()):
        super().__init__()
        self.feature_spec = list(feature_spec or [])  # the FeatureSpec blocks `features` must hold
        self.net = net.eval()
        self.actions = list(actions)
        self.fallback = fallback
        self.hold = hold
        self.max_depth = max(a.depth for a in actions)
        self.coordination = coordination
        self.max_draft_load = max_draft_load
        self.static_loads = tuple(static_loads)
        self.levels = torch.tensor(action_levels(self.actions))
        self.fallback_count = 0
        self._held: dict[object, list[int]] = {}  # request id -> [action index, steps left]
        self._warned: set[str] = set()

    @classmethod
    def from_file(cls, path: str | Path, config=None, *, hidden_size: int | None = None,
                  feature_dims: dict[str, int] | None = None) -> ShapePolicy:
        pf = load_policy(path, config=config, hidden_size=hidden_size, feature_dims=feature_dims)
        return cls(pf.net, pf.actions, config.shape if config is not None else DEFAULT_SHAPE, pf.hold,
                   pf.feature_spec, pf.coordination, pf.max_draft_load, pf.static_loads)

    def drafts_at(self, batch_load: int) -> bool:
        """Whether the network is asked at this load (else every request gets NO_DRAFTS)."""
        return drafts_at(batch_load, self.max_draft_load)

    def shape_at_load(self, batch_load: int) -> TreeShape | None:
        """The shape every request runs at this load without the network: NO_DRAFTS above the
        load gate, a `static_loads` row's shape, else None (the network and the holds decide)."""
        if not self.drafts_at(batch_load):
            return NO_DRAFTS
        return next((r.shape for r in self.static_loads if r.first <= batch_load <= r.last), None)

    @torch.no_grad()
    def forward(self, features: torch.Tensor, recent_accept: torch.Tensor, batch_load: int) -> torch.Tensor:
        """Action indices [B] (int64; FALLBACK where the policy could not decide)."""
        try:
            batch = int(features.shape[0])
        except Exception:
            batch = int(getattr(recent_accept, "numel", lambda: 0)())
        try:
            extras = torch.stack([
                torch.full((batch,), math.log2(batch_load) / 6.0),  # simulator.extra_features
                recent_accept.float().reshape(batch) / self.max_depth,
            ], dim=1)
            scores = self.net(torch.cat([features.float(), extras], dim=1))
            bad = ~torch.isfinite(scores).all(dim=-1)
            if self.coordination is not None and not bad.any():
                chosen = coordinated_choice(scores, self.levels, self.coordination, batch_load)
            else:
                chosen = scores.argmax(dim=-1)
            if bad.any():
                chosen[bad] = FALLBACK
                self.fallback_count += int(bad.sum())
            return chosen
        except Exception as e:  # the engine step must go on: fall back, count, log once per kind
            self.fallback_count += batch
            self._warn(e)
            return torch.full((batch,), FALLBACK, dtype=torch.int64)

    def choose(self, request_ids: list, features: torch.Tensor, recent_accept: torch.Tensor,
               batch_load: int | None = None) -> list[TreeShape]:
        """Shapes for this step's requests, in order. batch_load defaults to len(request_ids)."""
        try:
            load = batch_load or len(request_ids)
            fixed = self.shape_at_load(load)
            if fixed is not None:
                self.forget_holds(request_ids)  # asked afresh at a load where the network decides
                return [fixed] * len(request_ids)
            need = [i for i, r in enumerate(request_ids) if self._held.get(r, (0, 0))[1] <= 0]
            if need:
                if len(need) == len(request_ids):  # nothing held: skip the row gather (a copy)
                    picked = self.forward(features, recent_accept, load).tolist()
                else:
                    rows = torch.as_tensor(need)
                    picked = self.forward(features[rows], recent_accept[rows], load).tolist()
                for i, action in zip(need, picked):
                    # a fallback is not held: the next step asks the network again
                    self._held[request_ids[i]] = [action, self.hold if action != FALLBACK else 1]
            shapes = []
            for r in request_ids:
                held = self._held[r]
                held[1] -= 1
                shapes.append(self.fallback if held[0] == FALLBACK else self.actions[held[0]])
            return shapes
        except Exception as e:
            self.fallback_count += len(request_ids)
            self._warn(e)
            return [self.fallback] * len(request_ids)

    def drafts_nothing_next(self, request_id, batch_load: int) -> bool:
        """Whether `choose` at this load will give this request NO_DRAFTS without the network:
        the load gate is shut, or it holds NO_DRAFTS at a load without a static row."""
        shape = self.shape_at_load(batch_load)
        if shape is None:
            shape = self.held(request_id)
        return shape is not None and not shape.drafts

    def needs_network(self, request_ids, batch_load: int) -> bool:
        """Whether `choose` at this load asks the network (and so needs the features)."""
        return self.shape_at_load(batch_load) is None and any(self.held(r) is None for r in request_ids)

    def held(self, request_id) -> TreeShape | None:
        """The shape a request's next `choose` will give without asking the network (its hold
        has steps left), or None."""
        held = self._held.get(request_id)
        if held is None or held[1] <= 0 or held[0] == FALLBACK:
            return None
        return self.actions[held[0]]

    def forget_holds(self, request_ids) -> None:
        """Drop these requests' holds (at a load whose shape is fixed: they are asked afresh when
        the network decides again)."""
        for r in request_ids:
            self._held.pop(r, None)

    def release(self, request_id) -> None:
        """Forget a finished request's hold counter."""
        self._held.pop(request_id, None)

    def _warn(self, error: Exception) -> None:
        kind = type(error).__name__
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning("respsp shape policy failed (%s: %s); using the static shape %s",
                           kind, error, self.fallback)

