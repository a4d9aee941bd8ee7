"""One respsp runtime per vLLM model runner: the state that lives between engine steps.

Step order inside vLLM's runner, and what respsp does at each point:
  _prepare_inputs      `on_prepare_inputs`: index the step's requests once, lay out the trees,
                       rewrite RoPE positions
  model forward        tree rows attend through their ancestor masks (the tree-attention backend)
  _sample              `sample`: tree verification + KV compaction (chains: vLLM's sampler)
  propose drafts       `propose`: extend the draft caches, choose shapes, grow the trees
Anything that goes wrong in `propose` costs one step of speculation for the batch, never a
request: the drafts are empty and the failure is counted. The runtime knows no attention layout
and no platform: `vllm_respsp.backends` does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import replace

import torch

from vllm_respsp import envs
from vllm_respsp.backends import SUPPORTED, TreeAttentionBackend, for_vllm_backend
from vllm_respsp.config import RespspConfig
from vllm_respsp.runtime import metrics
from vllm_respsp.runtime.choose import ShapeChooser
from vllm_respsp.runtime.drafter import NewRows, PaddedContexts, TreeDrafter
from vllm_respsp.runtime.head import HeadAdapter
from vllm_respsp.runtime.head_kv import PagedHeadKV
from vllm_respsp.runtime.recorder import TraceRecorder
from vllm_respsp.runtime.sampler import PLACEHOLDER, compaction_moves, seeded_sampler_of, upstream_reason, verify_trees
from vllm_respsp.runtime.step import RootRequest, StepIndex, StepRoots, StepRows
from vllm_respsp.step_clock import SECONDS, timed
from vllm_respsp.tree.shape import NO_DRAFTS, TreeShape
from vllm_respsp.tree.step_trees import ProposedTree, StepTrees

logger = logging.getLogger("vllm_respsp")


class RespspRuntime:
    def __init__(self, runner, config: RespspConfig):
        self.runner = runner
        self.config = config
        record = envs.record_dir()
        self.recorder = TraceRecorder(record, config.shapes) if record else None
        # the measured schedule decides on wall time: only where one process decides alone
        self.rank, tp_size = _tensor_parallel()
        self.choose = ShapeChooser(config, measure=self.recorder is None and tp_size == 1)
        self.decode_only = False  # the step schedules no prefill (its time measures decoding)
        self._drafter: TreeDrafter | None = None
        self.proposed: dict[str, ProposedTree] = {}
        self.index: StepIndex | None = None
        # batch index -> why that request needs vLLM's own sampler (it drafts chains)
        self.upstream: dict[int, str] = {}
        self._upstream_of: dict[str, str | None] = {}  # per request: its sampling params never change
        self.step_trees: StepTrees | None = None  # None: no request verifies a real tree this step
        self.drafted: set[int] = set()  # batch indices of the step's requests with drafts
        self.accepted: dict[int, list[int]] = {}
        self.broken: set[str] = set()
        self.shape_counts: Counter[str] = Counter()
        self.fallbacks: Counter[str] = Counter()
        # shape -> {draft tokens the scheduler gave a request of that shape: steps}
        self.scheduled: dict[str, Counter[int]] = {}
        self.recomputed = 0
        self.prefix_cached = 0
        self.deferred_steps = 0  # request-steps whose head pass was deferred (NO_DRAFTS held)
        self.gated_steps = 0  # steps at a load where nothing drafts (`_hold_everyone`)
        self.steps = 0
        # Every tensor-parallel rank runs this runtime and must lay out the same trees: a digest
        # of every (step, request, shape) decision and every proposed tree lets tests compare ranks.
        # Kept only where the stats file reports it: hashing every decision is not serving work.
        self.decisions = hashlib.sha256() if envs.stats_file() else None

    @property
    def drafter(self) -> TreeDrafter:
        if self._drafter is None:
            self._drafter = TreeDrafter(HeadAdapter(self.runner.drafter.model), self._head_kv())
        return self._drafter

    def _head_kv(self) -> PagedHeadKV | None:
        """The head's keys/values in vLLM's paged cache of the head's attention layer (allocated
        by vLLM as for its EAGLE-3 drafter), or None (a dense store; said in one log line)."""
        proposer = self.runner.drafter
        names = sorted(getattr(proposer, "_draft_attn_layer_names", ()))
        if len(names) != 1:
            reason = f"the head has {len(names)} attention layers with a KV cache, not 1"
        else:
            layer = self.runner.vllm_config.compilation_config.static_forward_context[names[0]]
            group = getattr(proposer, "kv_cache_gid", -1)
            reason = PagedHeadKV.unusable(self.runner, names[0], layer, group, self.backend)
        if reason:
            logger.warning("respsp: the draft head's keys/values are kept outside vLLM's KV cache (%s): "
                           "vLLM's memory plan does not count them and the prefix cache does not keep them",
                           reason)
            return None
        return PagedHeadKV(self.runner, layer, group, self.backend)

    # -- the attention backend ----------------------------------------------------------
    @functools.cached_property
    def attention_layers(self) -> list:
        try:
            context = self.runner.vllm_config.compilation_config.static_forward_context
        except AttributeError:  # a runner built outside vLLM (unit tests)
            return []
        return [layer for layer in context.values() if hasattr(layer, "attn_backend") and hasattr(layer, "impl")]

    @functools.cached_property
    def backend(self) -> TreeAttentionBackend | None:
        """The tree-attention backend for this engine's attention layers, or None (then every
        tree is drafted as a chain of its depth, which vLLM's causal attention verifies, and
        each is counted as a fallback)."""
        names = sorted({layer.attn_backend.get_name() for layer in self.attention_layers})
        backend = for_vllm_backend(names[0]) if len(names) == 1 else None
        reason = None
        if backend is None:
            reason = f"attention backend(s) {names} (respsp has tree backends for {list(SUPPORTED)})"
        else:
            reason = backend.layout_error(self.attention_layers)
        if reason:
            logger.warning("respsp: tree attention cannot run on %s; trees are drafted as chains", reason)
            return None
        return backend

    @property
    def trees_supported(self) -> bool:
        return self.backend is not None

    # -- before the forward -------------------------------------------------------------
    def on_prepare_inputs(self, scheduler_output) -> None:
        runner = self.runner
        self.index = index = StepIndex.of(runner)
        self.upstream = self._upstream_requests(index)
        self.accepted = {}
        spec_tokens = scheduler_output.scheduled_spec_decode_tokens
        self.drafted = {i for i, req_id in enumerate(index.req_ids) if spec_tokens.get(req_id)}
        if self.choose.schedule is not None:  # only the schedule reads it
            self.decode_only = index.num_tokens == index.num_reqs + sum(len(t) for t in spec_tokens.values())
        try:
            with timed("tree_layout"):
                self._lay_out_trees(index, spec_tokens)
        except Exception:  # verifying the drafts as chains is still exact
            logger.exception("respsp: could not lay out this step's trees; verifying them as chains")
            self._fallback("tree_layout_error")
            self.step_trees = None

    def _lay_out_trees(self, index: StepIndex, spec_tokens: dict[str, list[int]]) -> None:
        """The step's trees over vLLM's flattened rows, their RoPE positions rewritten."""
        runner = self.runner
        self.step_trees = StepTrees.build(index.req_ids, spec_tokens, self.proposed, index.query_start,
                                          index.num_computed, runner.input_batch.block_table[0].slot_mapping.gpu)
        if self.step_trees is not None:
            self.step_trees.rewrite_positions(runner.positions)
        for req_id, drafts in spec_tokens.items():  # (a request that proposed nothing: NO_DRAFTS)
            tree = self.proposed.get(req_id)
            shape = tree.shape if tree is not None else str(NO_DRAFTS)
            self.scheduled.setdefault(shape, Counter())[len(drafts)] += 1

    # -- verification -------------------------------------------------------------------
    def sample(self, logits, spec_decode_metadata, sampling_metadata, vllm_sample):
        """SamplerOutput for a step with real trees, or None to let vLLM's sampler run.

        Requests that need vLLM's own sampler (logprobs, penalties, structured output, ...)
        drafted chains; in a step where other requests verify trees, vLLM's sampler
        (`vllm_sample()`) still runs for the whole batch and their rows (and logprobs) are
        taken from it: only they fall back, the rest keep their trees."""
        from vllm.v1.outputs import SamplerOutput

        trees = self.step_trees
        if trees is None or spec_decode_metadata is None:
            return None
        with timed("verify"):
            out, accepted = verify_trees(trees, logits, spec_decode_metadata, sampling_metadata,
                                         self.index.num_reqs, seeded_sampler_of(self.runner.sampler))
        self.accepted = {int(b): nodes for b, nodes in zip(trees.batch_index.tolist(), accepted)}
        logprobs = None
        if self.upstream:
            with timed("vllm_sampler"):
                theirs = vllm_sample()
            rows = torch.tensor(sorted(self.upstream))
            width = min(out.shape[1], theirs.sampled_token_ids.shape[1])
            out[rows] = PLACEHOLDER
            out[rows, :width] = theirs.sampled_token_ids[rows.to(logits.device), :width].to(out.device, out.dtype)
            logprobs = theirs.logprobs_tensors
            for b in self.upstream:  # chains: their accepted nodes are their accepted prefix
                self.accepted.pop(b, None)
        with timed("compact_kv"):
            # Chains need no moves: their accepted nodes are already contiguous.
            src, dst = compaction_moves(trees, accepted)
            if src.numel():
                self.backend.compact(self.attention_layers, src, dst)
        return SamplerOutput(sampled_token_ids=out.to(logits.device), logprobs_tensors=logprobs)

    # -- drafting -----------------------------------------------------------------------
    def propose(self, scheduler_output, sampled_token_ids, aux_hidden_states) -> list[list[int]]:
        index = self.index or StepIndex.of(self.runner)
        try:
            with timed("draft"):
                drafts = self._propose(index, sampled_token_ids, aux_hidden_states)
        except Exception:
            logger.exception("respsp: drafting failed; this step proposes no drafts")
            self._fallback("drafter_error")
            self.proposed = {}
            drafts = [[] for _ in index.req_ids]
        self.choose.end_step(index.num_reqs, sampled_token_ids, self.decode_only)
        self.steps += 1
        self._write_stats()
        return drafts

    def _propose(self, index: StepIndex, sampled_token_ids, aux_hidden_states):
        """Extend every request's draft context with its newly verified tokens, then choose a
        shape for each request that can draft and grow all trees in one batched pass."""
        self._forget_finished()
        self.choose.begin_step(index.num_reqs)
        sampled = sampled_token_ids.tolist()  # one host copy for the batch
        new_rows, roots = self._verified_rows(index, sampled)
        self.proposed = {}
        if not new_rows:
            return [[] for _ in index.req_ids]
        aux = torch.cat([h[:index.num_tokens] for h in aux_hidden_states], dim=-1)
        if not self.drafted and self.recorder is None and not self.choose.drafts_at(index.num_reqs):
            self._hold_everyone(aux, new_rows, roots)
            return [[] for _ in index.req_ids]
        roots, root_states = self._extend(aux, new_rows, roots, index.num_reqs)
        if not roots:
            return [[] for _ in index.req_ids]
        roots_at = root_states.at([r.context_row for r in roots])
        if self.recorder is not None:  # record every action's tree, draft nothing
            self._record(roots, roots_at, root_states.padded)
            return [[] for _ in index.req_ids]
        shapes = self._shapes(index, roots, roots_at)
        self._grow(roots, shapes, root_states)
        return [self.proposed[r].tokens[1:] if r in self.proposed else [] for r in index.req_ids]

    def _extend(self, aux: torch.Tensor, new_rows: list[NewRows], roots: list[RootRequest], batch_load: int):
        """Run the head over the verified positions of the requests that may draft this step;
        defer those of requests already known to draft nothing (no head pass, no root: they
        catch up in one batched pass when they draft again). Returns the roots, renumbered over
        the extended rows (-1: deferred), and their states."""
        skip = set() if self.recorder is not None else \
            {r.req_id for r in roots if self.choose.drafts_nothing_next(r.req_id, batch_load)}
        self.drafter.defer(aux, [rows for rows in new_rows if rows.req_id in skip])
        self.deferred_steps += len(skip)
        extended = [rows for rows in new_rows if rows.req_id not in skip]
        row_of = {rows.req_id: i for i, rows in enumerate(extended)}
        roots = [RootRequest(r.req_id, row_of.get(r.req_id, -1), r.token, r.position) for r in roots]
        with timed("draft_extend"):
            states, padded = self.drafter.extend(aux, extended) if extended else (None, None)
        return roots, StepRoots(states, padded, self.drafter)

    def _hold_everyone(self, aux: torch.Tensor, new_rows: list[NewRows], roots: list[RootRequest]) -> None:
        """A step at a load where nothing drafts (the policy's load gate is shut) and no request
        verified drafts: every request's verified positions are deferred and every root takes
        NO_DRAFTS, with none of the per-request choosing a drafting step does."""
        self.drafter.defer(aux, new_rows)
        self.deferred_steps += len(new_rows)
        self.gated_steps += 1
        self.choose.hold_all([r.req_id for r in roots])
        self._count_shapes({str(NO_DRAFTS): len(roots)})

    def _forget_finished(self) -> None:
        live = set(self.runner.requests)
        self._upstream_of = {r: why for r, why in self._upstream_of.items() if r in live}
        self.drafter.forget(live)
        self.choose.forget(live)
        if self.recorder is not None:
            self.recorder.forget(live)
        self.broken &= live

    def _verified_rows(self, index: StepIndex, sampled_rows: list[list[int]]):
        """(NewRows per request to append to its draft context, the requests that can draft)."""
        discard = self.runner.discard_request_mask.np[:index.num_reqs]
        steps = StepRows(self.runner, index)
        new_rows: list[NewRows] = []
        roots: list[RootRequest] = []
        for i, req_id in enumerate(index.req_ids):
            start, n_sched = int(index.num_computed[i]), index.scheduled(i)
            if req_id in self.broken or n_sched == 0 or not self._context_in_step(req_id, start):
                continue
            valid = [t for t in sampled_rows[i] if t >= 0]
            if i in self.drafted:  # its accepted path
                if valid:
                    self.choose.observe(req_id, n_sched - 1, len(valid) - 1)
                nodes = self.accepted.get(i, list(range(len(valid))))
                rows, next_tokens = torch.tensor(nodes) + steps.first_row(i), torch.tensor(valid[:len(nodes)])
                count = len(nodes)
            else:
                rows, next_tokens = steps.of(i, valid[0] if valid and not discard[i] else None)
                count = n_sched
            if not discard[i] and valid:
                roots.append(RootRequest(req_id, len(new_rows), valid[-1], start + count))
            new_rows.append(NewRows(req_id, start, rows, next_tokens))
        steps.finish()
        return new_rows, roots

    def _context_in_step(self, req_id: str, start: int) -> bool:
        """Whether the request's draft context reaches this step's first position (counting
        the requests whose context restarts)."""
        held = self.drafter.context_length(req_id)
        if start == 0 and held > 0:
            self.recomputed += 1  # preempted, now recomputed from the prompt: restart its cache
        if start > 0 and held == 0:
            self.prefix_cached += 1  # its prompt began in vLLM's prefix cache (see runtime.head_kv)
        elif start > 0 and held < start:
            self.broken.add(req_id)  # a step ran without us (e.g. near max_model_len)
            self._fallback("lost_draft_context")
            return False
        return True

    def _record(self, roots: list[RootRequest], roots_at, padded: PaddedContexts | None) -> None:
        requests = self.runner.requests
        self.recorder.record(self.drafter, [r.req_id for r in roots],
                             [requests[r.req_id].prompt_token_ids for r in roots],
                             [r.token for r in roots], [r.position for r in roots], roots_at, padded)

    def _shapes(self, index: StepIndex, roots: list[RootRequest], roots_at) -> list[TreeShape]:
        """The shape each root request drafts this step (NO_DRAFTS included), after the
        restrictions that apply: chains where a tree cannot be verified, the room left."""
        requests = self.runner.requests
        with timed("choose_shapes"):
            picked, failed = self.choose([r.req_id for r in roots],
                                         [requests[r.req_id].prompt_token_ids for r in roots],
                                         roots_at, index.num_reqs)
        if failed:
            self._fallback("policy_error", failed)
        row = {req_id: i for i, req_id in enumerate(index.req_ids)}
        tree_less = None if self.trees_supported else "unsupported_attention_backend"
        shapes = [self._fit(shape, root, self.upstream.get(row[root.req_id], tree_less))
                  for shape, root in zip(picked, roots)]
        if self.decisions is not None:
            for root, shape in zip(roots, shapes):
                self.decisions.update(f"{self.steps}:{root.req_id}:{shape};".encode())
        self._count_shapes(Counter(str(s) for s in shapes if s is not None))
        return shapes

    def _count_shapes(self, counts: dict[str, int]) -> None:
        for shape, count in counts.items():
            if count:
                self.shape_counts[shape] += count
                metrics.record_shape(shape, count)

    def _fit(self, shape: TreeShape, root: RootRequest, chains_only: str | None) -> TreeShape | None:
        """The shape cut to what may run: a chain of its depth when this request's tree cannot be
        verified (`chains_only` says why; counted per request and step), at most the room left
        before max_model_len; None when there is no room at all."""
        if chains_only and shape.drafts and shape.top_k > 1:
            shape = replace(shape, total_tokens=shape.depth, top_k=1)
            self._fallback(f"chain_for_{chains_only}")
        room = self.runner.max_model_len - root.position - 1
        if room <= 0:
            return None
        if shape.total_tokens > room:
            shape = replace(shape, total_tokens=room, depth=min(shape.depth, room))
        return shape

    def _grow(self, roots: list[RootRequest], shapes: list[TreeShape | None], root_states) -> None:
        """Draft every tree of the step in one batched pass (NO_DRAFTS requests verify only
        their bonus token next step) and keep them as this step's proposals (not a tree a
        verify bound cut to its root: that request verifies only its bonus token too)."""
        chosen = [(root, shape) for root, shape in zip(roots, shapes) if shape is not None and shape.drafts]
        if not chosen:
            return
        states = root_states.at([root.context_row for root, _ in chosen])
        names = {shape: str(shape) for _, shape in chosen}
        if all(shape.is_chain for _, shape in chosen):  # chains only (vLLM's K, bounded chains): no rerank
            with timed("draft_grow"):
                chains = self.drafter.draft_chains([root.req_id for root, _ in chosen], [s for _, s in chosen],
                                                   states.hidden, states.logprobs, root_states.padded)
            for (root, shape), drafts in zip(chosen, chains):
                n = len(drafts)
                if n:
                    self._propose_tree(root.req_id, ProposedTree([root.token, *drafts], list(range(-1, n)),
                                                                 list(range(n + 1)), names[shape]))
            return
        with timed("draft_grow"):
            tree = self.drafter.draft([root.req_id for root, _ in chosen], [shape for _, shape in chosen],
                                      torch.tensor([root.token for root, _ in chosen]),
                                      states.hidden, states.logprobs, root_states.padded)
        # one host copy of the batch's trees, cut per request (not one tensor slice each)
        n = tree.tokens.numel()
        host = torch.cat([tree.tokens.long(), tree.parents.long(), tree.depths.long(),
                          tree.cu_nodes.long().to(tree.tokens.device)]).tolist()
        tokens, parents, depths, cu = host[:n], host[n:2 * n], host[2 * n:3 * n], host[3 * n:]
        for b, (root, shape) in enumerate(chosen):
            nodes = slice(cu[b], cu[b + 1])
            if cu[b + 1] - cu[b] > 1:
                tree_b = ProposedTree(tokens[nodes], parents[nodes], depths[nodes], names[shape])
                self._propose_tree(root.req_id, tree_b)

    def _propose_tree(self, req_id: str, tree: ProposedTree) -> None:
        self.proposed[req_id] = tree
        if self.decisions is not None:
            self.decisions.update(f"{tree.tokens}{tree.parents}".encode())

    def _upstream_requests(self, index: StepIndex) -> dict[int, str]:
        """{batch index: reason} of the requests whose sampling needs vLLM's own sampler."""
        out = {}
        for i, req_id in enumerate(index.req_ids):
            if req_id not in self._upstream_of:
                params = self.runner.requests[req_id].sampling_params
                self._upstream_of[req_id] = upstream_reason(params) if params is not None else None
            reason = self._upstream_of[req_id]
            if reason:
                out[i] = reason
        return out

    def _fallback(self, kind: str, count: int = 1) -> None:
        """Count a safety net that fired (stats file; the Prometheus counter)."""
        self.fallbacks[kind] += count
        metrics.record_fallback(kind, count)

    def stats(self) -> dict:
        return {"steps": self.steps, "shapes": dict(self.shape_counts), "fallbacks": dict(self.fallbacks),
                "tensor_parallel_rank": self.rank,
                "decisions_digest": self.decisions.hexdigest()[:16] if self.decisions else None,
                "recomputed_requests": self.recomputed, "prefix_cached_requests": self.prefix_cached,
                "deferred_request_steps": self.deferred_steps, "gated_steps": self.gated_steps,
                "restarted_draft_contexts": self._drafter.restarts if self._drafter else 0,
                "live_deferred_contexts": len(self._drafter.deferred) if self._drafter else 0,
                "live_draft_contexts": len(self._drafter.contexts) if self._drafter else 0,
                "live_proposed_trees": len(self.proposed),
                "live_policy_holds": self.choose.live_holds,
                "tree_backend": type(self.backend).__name__ if self.backend is not None else None,
                "head_kv": "paged" if self._drafter and isinstance(self._drafter.kv, PagedHeadKV) else "dense",
                "seconds": {k: round(v, 4) for k, v in SECONDS.items()},
                "scheduled_drafts": {shape: dict(c) for shape, c in self.scheduled.items()},
                "schedule": self.choose.schedule.report() if self.choose.schedule is not None else None,
                "config": self.config.to_dict()}

    def _write_stats(self) -> None:
        path = envs.stats_file()
        if path:
            path = path if self.rank == 0 else f"{path}.rank{self.rank}"
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(self.stats(), f)
            os.replace(tmp, path)


def _tensor_parallel() -> tuple[int, int]:
    """(this rank, the tensor-parallel size)."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        return int(get_tensor_model_parallel_rank()), int(get_tensor_model_parallel_world_size())
    except Exception:  # no distributed state (unit tests, a runner built outside vLLM)
        return 0, 1
