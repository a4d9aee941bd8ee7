"""What respsp reads of one engine step's batch: the ragged request index (read from the runner
once, before the forward), the step's root states by extended row, the requests that can draft,
and the verified rows of requests that had no drafts with their next tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_respsp.policy.features import RootStates
from vllm_respsp.runtime.drafter import PaddedContexts, TreeDrafter


@dataclass
class StepIndex:
    """The step's ragged request index, read from the runner once (before the forward) and
    passed to every later phase of the step."""

    req_ids: list[str]
    query_start: np.ndarray  # int [R + 1] first token row of each request
    num_computed: np.ndarray  # int [R] tokens computed before this step

    @classmethod
    def of(cls, runner) -> StepIndex:
        batch = runner.input_batch
        n = batch.num_reqs
        return cls(list(batch.req_ids), runner.query_start_loc.np[:n + 1].copy(),
                   batch.num_computed_tokens_cpu[:n].copy())

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.query_start[-1])

    def scheduled(self, i: int) -> int:
        return int(self.query_start[i + 1] - self.query_start[i])


class StepRoots:
    """The step's root states by extended row; a deferred request (row -1) reads zeros: it is
    held on NO_DRAFTS, so no policy reads its features and no tree grows from it."""

    def __init__(self, states, padded: PaddedContexts | None, drafter: TreeDrafter):
        self.states = states
        self.padded = padded  # the contexts `extend` padded, for `draft`
        self.drafter = drafter

    def at(self, rows: list[int]) -> RootStates:
        if self.states is not None and rows == list(range(self.states.hidden.shape[0])):
            return self.states  # every extended row, in order (the common step): no copy
        index = torch.tensor(rows)
        if self.states is None:  # every request deferred: zeros, one row expanded (nothing reads them)
            h = self.drafter.head.model.config.hidden_size
            vocab = self.drafter.head.draft_to_target.numel()
            return RootStates(*(torch.zeros(1, n).expand(len(rows), n) for n in (h, h, vocab)))
        picked = self.states[index.clamp(min=0)]
        if any(r < 0 for r in rows):
            deferred = index < 0
            picked = RootStates(*(t.masked_fill(deferred[:, None].to(t.device), 0.0)
                                  for t in (picked.fused, picked.hidden, picked.logprobs)))
        return picked


@dataclass
class RootRequest:
    """A request whose next tree can be drafted: its row among the extended contexts, the
    root token (last verified token) and the root's position."""

    req_id: str
    context_row: int
    token: int
    position: int



class StepRows:
    """The step's rows and their next tokens, for requests that verified no drafts: every row
    of request i (a decode step's one row, or a prefill chunk) is a verified position, and the
    next token of each is the following input row, except the last, whose next token is the one
    sampled (or, when the request sampled nothing, e.g. a partial prefill chunk, the prompt's
    next token). Built once for the batch; each request gets views."""

    def __init__(self, runner, index: StepIndex):
        self.runner, self.index = runner, index
        self.rows: torch.Tensor | None = None  # built on the first `of` (a step of drafted requests needs none)
        self.next: torch.Tensor | None = None
        self.last_rows: list[int] = []
        self.last_tokens: list[int] = []

    def _build(self) -> None:
        n = self.index.num_tokens
        self.rows = torch.arange(n)
        self.next = torch.empty(n, dtype=torch.long)
        self.next[:n - 1] = self.runner.input_ids.cpu[1:n]

    def first_row(self, i: int) -> int:
        return int(self.index.query_start[i])

    def of(self, i: int, sampled: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, next tokens) of request i; `sampled`: its sampled token, or None."""
        if self.rows is None:
            self._build()
        a, b = int(self.index.query_start[i]), int(self.index.query_start[i + 1])
        if sampled is None:
            sampled = int(self.runner.input_batch.token_ids_cpu[i, int(self.index.num_computed[i]) + b - a])
        self.last_rows.append(b - 1)
        self.last_tokens.append(sampled)
        return self.rows[a:b], self.next[a:b]

    def finish(self) -> None:
        """Write the last rows' next tokens (the views handed out see them)."""
        if self.last_rows:
            self.next[torch.tensor(self.last_rows)] = torch.tensor(self.last_tokens)
