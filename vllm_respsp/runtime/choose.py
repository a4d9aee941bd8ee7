"""Which tree shape each request drafts at this step.

- `"static"`: the config's `shape` for every request.
- `"cycle"`: one of `actions` per request, fixed by its prompt, so one batch mixes shapes
  (tests, demos, A/B runs).
- a policy file: the learned `ShapePolicy`, one batched call per step for every request whose
  hold ran out, over the features of `policy.features` and the extras the simulator builds
  (batch load, an EMA of each request's accepted draft tokens). With `schedule: "measured"`
  (opt-in) a `MeasuredSchedule` picks each step's mode where the policy's gate is open:
  the policy's shapes, a chain of 1-3 drafts for every request, or no drafts
  (policy/schedule.py).

A policy that fails (raises, returns NaN, wrong widths) gives the affected requests the static
shape for this step; each such request-step is counted as a `policy_error` fallback.
"""

from __future__ import annotations

import logging
import time

import torch

from vllm_respsp.config import POLICIES, RespspConfig
from vllm_respsp.policy.features import RootStates, feature_dims, policy_features
from vllm_respsp.policy.schedule import NO_DRAFTS, POLICY, MeasuredSchedule, chain_length, mode_shape, modes_within
from vllm_respsp.policy.shape_policy import ShapePolicy
from vllm_respsp.policy.simulator import update_recent
from vllm_respsp.runtime import metrics
from vllm_respsp.tree.shape import TreeShape

logger = logging.getLogger("vllm_respsp")


class ShapeChooser:
    def __init__(self, config: RespspConfig, measure: bool = True):
        """measure: whether a policy file's `schedule: "measured"` may run (False where ranks
        would measure different times: tensor-parallel size > 1)."""
        self.config = config
        measured = measure and self.learned and config.schedule == "measured"
        self.schedule = MeasuredSchedule(modes_within(config.max_total_tokens)) if measured else None
        self.step_mode: str | None = None  # this step's mode; None: the schedule did not choose
        self.verified_mode: str | None = None  # the last step's: the drafts this step verifies
        self.actions = list(config.actions) or [config.shape]
        self.policy: ShapePolicy | None = None  # loaded on first use: needs the head's width
        self.load_failed = False
        self.by_request: dict[str, TreeShape] = {}  # "cycle": chosen once per request
        self.recent: dict[str, float] = {}  # EMA of accepted draft tokens per request

    @property
    def learned(self) -> bool:
        return self.config.policy not in POLICIES

    @property
    def live_holds(self) -> int:
        """Per-request state still held (released when a request finishes)."""
        held = len(self.policy._held) if self.policy is not None else 0
        return held + len(self.by_request) + len(self.recent)

    def forget(self, keep: set[str]) -> None:
        for req_id in [r for r in self.by_request if r not in keep]:
            del self.by_request[req_id]
        for req_id in [r for r in self.recent if r not in keep]:
            del self.recent[req_id]
            if self.policy is not None:
                self.policy.release(req_id)

    def begin_step(self, batch_load: int) -> None:
        """Fix this step's mode: the schedule's, at a load where the policy's gate is open."""
        gate_open = self.policy is None or self.policy.drafts_at(batch_load)
        self.verified_mode = self.step_mode
        self.step_mode = self.schedule.mode(batch_load) if self.schedule is not None and gate_open else None

    def end_step(self, batch_load: int, sampled_token_ids: torch.Tensor, decode_only: bool) -> None:
        """The step is done: its time and emitted tokens go to the schedule (if it runs)."""
        if self.schedule is None:
            return
        mode = self.step_mode
        emitted = int((sampled_token_ids >= 0).sum()) if mode is not None else 0
        self.schedule.step_done(batch_load, mode, emitted, decode_only, time.perf_counter())
        if mode is not None:
            metrics.record_mode(mode)

    def drafts_at(self, batch_load: int) -> bool:
        """Whether any request may draft at this load: False when the policy's load gate is shut,
        the step's mode is NO_DRAFTS, or the static shape is NO_DRAFTS (a policy not loaded yet
        is asked, so True)."""
        if self.learned:
            if self.step_mode is not None:
                return self.step_mode != NO_DRAFTS
            return self.policy is None or self.policy.drafts_at(batch_load)
        return self.config.policy == "cycle" or bool(self.config.shape.drafts)

    def hold_all(self, req_ids: list[str]) -> None:
        """A step at which `drafts_at` is False gives these requests NO_DRAFTS without `__call__`:
        the policy forgets their holds as its own gated `choose` would (they are asked afresh
        when the load falls)."""
        if self.policy is not None:
            self.policy.forget_holds(req_ids)

    def drafts_nothing_next(self, req_id: str, batch_load: int) -> bool:
        """Whether this request's next shape is already known to be NO_DRAFTS (a held policy
        decision, a load above the policy's `max_draft_load`, its cycle action, or a static
        NO_DRAFTS): then it needs no root this step."""
        if self.learned:
            if self.step_mode not in (None, POLICY):
                return self.step_mode == NO_DRAFTS
            return self.policy is not None and self.policy.drafts_nothing_next(req_id, batch_load)
        if self.config.policy == "cycle":
            shape = self.by_request.get(req_id)
            return shape is not None and not shape.drafts
        return not self.config.shape.drafts

    def observe(self, req_id: str, drafts: int, accepted_drafts: int) -> None:
        """A verification step of `req_id` accepted this many of its `drafts` draft tokens."""
        if chain_length(self.verified_mode) is not None:
            self.schedule.verified_chain(drafts, accepted_drafts)
        if self.learned:
            # the simulator's own update: the policy sees the state it was trained on
            self.recent[req_id] = update_recent(self.recent.get(req_id, 0.0), accepted_drafts)

    def __call__(self, req_ids: list[str], prompts: list[list[int] | None], roots: RootStates,
                 batch_load: int) -> tuple[list[TreeShape], int]:
        """(one shape per request, number of request-steps the policy failed and fell back)."""
        if self.step_mode not in (None, POLICY):
            self.hold_all(req_ids)  # asked afresh when the policy's mode comes back
            return [mode_shape(self.step_mode)] * len(req_ids), 0
        if self.learned:
            return self._learned(req_ids, roots, batch_load)
        if self.config.policy != "cycle":
            return [self.config.shape] * len(req_ids), 0
        shapes = []
        for req_id, prompt in zip(req_ids, prompts):
            if not prompt:
                shapes.append(self.config.shape)
                continue
            if req_id not in self.by_request:
                self.by_request[req_id] = self.actions[sum(prompt) % len(self.actions)]
            shapes.append(self.by_request[req_id])
        return shapes, 0

    def _learned(self, req_ids, roots: RootStates, batch_load: int):
        if self.policy is None:
            if self.load_failed:
                return [self.config.shape] * len(req_ids), len(req_ids)
            try:  # checked at start-up already; this only fails if the file changed since
                self.policy = ShapePolicy.from_file(self.config.policy, self.config,
                                                    feature_dims=feature_dims(int(roots.hidden.shape[-1])))
            except Exception:
                logger.exception("respsp: could not load the shape policy; using the static shape %s",
                                 self.config.shape)
                self.load_failed = True
                return [self.config.shape] * len(req_ids), len(req_ids)
        before = self.policy.fallback_count
        features = torch.empty(0)
        # Features only when the network runs: a step where every request holds its shape
        # (e.g. all held on NO_DRAFTS, whose roots are zeros) or the load gate is shut asks
        # nothing of it.
        if self.policy.needs_network(req_ids, batch_load):
            try:
                features = policy_features(self.policy.feature_spec, roots)
            except Exception:  # ShapePolicy turns a bad feature tensor into fallbacks, never raises
                pass
        recent = torch.tensor([self.recent.setdefault(r, 0.0) for r in req_ids])
        shapes = self.policy.choose(req_ids, features, recent, batch_load)
        return shapes, self.policy.fallback_count - before
