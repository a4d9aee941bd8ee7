"""One respsp runtime per vLLM model runner: the state that lives between engine steps.

Step order inside vLLM's runner, and what respsp does at each point:
  _prepare_inputs      `on_prepare_inputs`: rebuild the step's trees, rewrite RoPE positions
  model forward        tree rows attend through their ancestor masks (patches.tree_attention)
  _sample              `sample`: tree verification + KV compaction (chains: vLLM's sampler)
  propose drafts       `propose`: extend the draft caches, choose shapes, grow the trees
Anything that goes wrong in `propose` costs one step of speculation for the batch, never a
request: the drafts are empty and the failure is counted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections import Counter
from contextlib import contextmanager

import torch

from vllm_respsp.config import RespspConfig, parse
from vllm_respsp.runtime import metrics
from vllm_respsp.runtime.choose import ShapeChooser
from vllm_respsp.runtime.drafter import NewRows, TreeDrafter
from vllm_respsp.runtime.recorder import RECORD_ENV, TraceRecorder
from vllm_respsp.runtime.head import HeadAdapter
from vllm_respsp.runtime.sampler import compaction_moves, upstream_reason, verify_trees
from vllm_respsp.runtime.step_trees import ProposedTree, StepTrees
from vllm_respsp.tree import verify
from vllm_respsp.tree.cpu_paged_kv import SUPPORTED_ISAS
from vllm_respsp.tree.shape import TreeShape, chain

logger = logging.getLogger("vllm_respsp")
STATS_ENV = "VLLM_RESPSP_STATS_FILE"
# Fault injection for the tests that prove the safety nets and the statistical checks work:
# "keep_rejected" makes the tree sampler biased (rejected drafts stay in the residual),
# "drafter_raises" makes every draft step fail.
FAULT_ENV = "VLLM_RESPSP_FAULT"
SECONDS: Counter[str] = Counter()  # wall time per respsp phase in this process


@contextmanager
def timed(phase: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        SECONDS[phase] += time.perf_counter() - start


class RespspRuntime:
    def __init__(self, runner, config: RespspConfig):
        if os.environ.get(FAULT_ENV) == "keep_rejected":  # the biased sampler of the statistical test
            verify.remove_rejected = lambda p, rows, tokens: None
        self.runner = runner
        self.config = config
        self.choose = ShapeChooser(config, fault=os.environ.get(FAULT_ENV))
        self.recorder = TraceRecorder(os.environ[RECORD_ENV], config.shapes) \
            if os.environ.get(RECORD_ENV) else None
        self._drafter: TreeDrafter | None = None
        self.proposed: dict[str, ProposedTree] = {}
        self.step_trees: StepTrees | None = None
        self.accepted: dict[int, list[int]] = {}
        self.broken: set[str] = set()
        self.shape_counts: Counter[str] = Counter()
        self.fallbacks: Counter[str] = Counter()
        # shape -> {draft tokens the scheduler gave a request of that shape: steps}
        self.scheduled: dict[str, Counter[int]] = {}
        self.recomputed = 0
        self.prefix_cached = 0
        self.steps = 0
        # Every tensor-parallel rank runs this runtime and must lay out the same trees: a digest
        # of every (step, request, shape) decision and every proposed tree lets tests compare ranks.
        self.decisions = hashlib.sha256()
        self.rank = _tensor_parallel_rank()

    @property
    def drafter(self) -> TreeDrafter:
        if self._drafter is None:
            self._drafter = TreeDrafter(HeadAdapter(self.runner.drafter.model))
        return self._drafter

    # -- before the forward -------------------------------------------------------------
    def on_prepare_inputs(self, scheduler_output) -> None:
        runner = self.runner
        num_reqs = runner.input_batch.num_reqs
        self.accepted = {}
        try:
            self.step_trees = StepTrees.build(
                runner.input_batch.req_ids, scheduler_output.scheduled_spec_decode_tokens,
                self.proposed, runner.query_start_loc.np[:num_reqs + 1],
                runner.input_batch.num_computed_tokens_cpu[:num_reqs],
                runner.input_batch.block_table[0].slot_mapping.gpu)
            if self.step_trees is not None:
                self.step_trees.rewrite_positions(runner.positions)
            for req_id, drafts in scheduler_output.scheduled_spec_decode_tokens.items():
                tree = self.proposed.get(req_id)
                if tree is not None:
                    self.scheduled.setdefault(tree.shape, Counter())[len(drafts)] += 1
        except Exception:  # verifying the drafts as chains is still exact
            logger.exception("respsp: could not lay out this step's trees; verifying them as chains")
            self._fallback("tree_layout_error")
            self.step_trees = None

    def tree_attention_batch(self) -> StepTrees | None:
        trees = self.step_trees
        return trees if trees is not None and not trees.all_chains else None

    # -- verification -------------------------------------------------------------------
    def sample(self, logits, spec_decode_metadata, sampling_metadata):
        """SamplerOutput for a step with real trees, or None to let vLLM's sampler run."""
        from vllm.v1.outputs import SamplerOutput

        trees = self.tree_attention_batch()
        if trees is None or spec_decode_metadata is None:
            return None
        runner = self.runner
        with timed("verify"):
            out, accepted = verify_trees(trees, logits, spec_decode_metadata, sampling_metadata,
                                         runner.input_batch.num_reqs)
        with timed("compact_kv"):
            src, dst = compaction_moves(trees, accepted)
            if src.numel():
                from vllm_respsp.patches.tree_attention import compact_kv_caches

                compact_kv_caches(runner, src, dst)
        self.accepted = {int(b): nodes for b, nodes in zip(trees.batch_index.tolist(), accepted)}
        return SamplerOutput(sampled_token_ids=out.to(logits.device), logprobs_tensors=None)

    # -- drafting -----------------------------------------------------------------------
    def propose(self, scheduler_output, sampled_token_ids, aux_hidden_states) -> list[list[int]]:
        runner = self.runner
        req_ids = list(runner.input_batch.req_ids)
        try:
            with timed("draft"):
                drafts = self._propose(scheduler_output, req_ids, sampled_token_ids, aux_hidden_states)
        except Exception:
            logger.exception("respsp: drafting failed; this step proposes no drafts")
            self._fallback("drafter_error")
            self.proposed = {}
            drafts = [[] for _ in req_ids]
        self.steps += 1
        self._write_stats()
        return drafts

    def _propose(self, scheduler_output, req_ids, sampled_token_ids, aux_hidden_states):
        if os.environ.get(FAULT_ENV) == "drafter_raises":
            raise RuntimeError(f"{FAULT_ENV}=drafter_raises")
        runner = self.runner
        drafter = self.drafter
        live = set(runner.requests)
        drafter.forget(live)
        self.choose.forget(live)
        self.broken &= live
        num_reqs = len(req_ids)
        qsl = runner.query_start_loc.np[:num_reqs + 1]
        num_computed = runner.input_batch.num_computed_tokens_cpu[:num_reqs]
        discard = runner.discard_request_mask.np[:num_reqs]
        input_ids = runner.input_ids.cpu
        sampled = sampled_token_ids.cpu()
        drafting = set((self.step_trees.batch_index.tolist() if self.step_trees is not None else []))
        new_rows, root_of = [], {}
        for i, req_id in enumerate(req_ids):
            start, row0, n_sched = int(num_computed[i]), int(qsl[i]), int(qsl[i + 1] - qsl[i])
            if req_id in self.broken or n_sched == 0:
                continue
            held = drafter.context_length(req_id)
            if start == 0 and held > 0:
                self.recomputed += 1  # preempted, now recomputed from the prompt: restart its cache
            if start > 0 and held == 0:
                self.prefix_cached += 1  # its prompt began in vLLM's prefix cache (DraftContext)
            elif start > 0 and held < start:
                self.broken.add(req_id)  # a step ran without us (e.g. near max_model_len)
                self._fallback("lost_draft_context")
                continue
            valid = sampled[i][sampled[i] >= 0]
            if scheduler_output.scheduled_spec_decode_tokens.get(req_id) and len(valid):
                self.choose.observe(req_id, len(valid) - 1)
            if i in drafting:
                nodes = self.accepted.get(i, list(range(len(valid))))
                rows = torch.tensor(nodes) + row0
                next_tokens = valid[:len(nodes)].long()
            else:
                rows = torch.arange(row0, row0 + n_sched)
                if discard[i] or len(valid) == 0:
                    last = int(runner.input_batch.token_ids_cpu[i, start + n_sched])
                else:
                    last = int(valid[0])
                next_tokens = torch.cat([input_ids[row0 + 1:row0 + n_sched].long(), torch.tensor([last])])
            if not discard[i] and len(valid):
                root_of[req_id] = (len(new_rows), int(valid[-1]), start + len(rows))
            new_rows.append(NewRows(req_id, start, rows, next_tokens))
        self.proposed = {}
        if not new_rows:
            return [[] for _ in req_ids]
        aux = torch.cat([h[:int(qsl[num_reqs])] for h in aux_hidden_states], dim=-1)
        roots = drafter.extend(aux, new_rows)

        upstream = self._upstream_reason(scheduler_output, req_ids)
        if upstream:
            self._fallback(f"chain_for_{upstream}")
        elif not self.trees_supported:
            upstream = "unsupported_kv_layout"
        asking = list(root_of)
        if not asking:
            return [[] for _ in req_ids]
        if self.recorder is not None:  # record every action's tree, draft nothing
            self.recorder.forget(live)
            self.recorder.record(drafter, asking, [runner.requests[r].prompt_token_ids for r in asking],
                                 [root_of[r][1] for r in asking], [root_of[r][2] for r in asking],
                                 roots[torch.tensor([root_of[r][0] for r in asking])])
            return [[] for _ in req_ids]
        with timed("choose_shapes"):
            picked, failed = self.choose(asking, [runner.requests[r].prompt_token_ids for r in asking],
                                         roots[torch.tensor([root_of[r][0] for r in asking])], num_reqs)
        if failed:
            self._fallback("policy_error", failed)
        max_len = runner.max_model_len
        chosen, shapes, decided = [], [], []
        for req_id, shape in zip(asking, picked):
            index, root_token, root_pos = root_of[req_id]
            if upstream and shape.drafts and shape.top_k > 1:
                shape = chain(shape.depth, shape.min_prob)
                if upstream == "unsupported_kv_layout":
                    self._fallback("chain_for_unsupported_kv_layout")
            room = max_len - root_pos - 1
            if room <= 0:
                continue
            if shape.total_tokens > room:
                shape = TreeShape(room, min(shape.depth, room), shape.top_k, shape.min_prob)
            decided.append((req_id, shape))
            if shape.drafts:  # NO_DRAFTS: this request verifies only its bonus token next step
                chosen.append((req_id, index, root_token))
                shapes.append(shape)
        for req_id, shape in decided:
            self.decisions.update(f"{self.steps}:{req_id}:{shape};".encode())
        for shape, count in Counter(str(shape) for _, shape in decided).items():
            self.shape_counts[shape] += count
            metrics.record_shape(shape, count)
        if not chosen:
            return [[] for _ in req_ids]
        index = torch.tensor([c[1] for c in chosen])
        tree = drafter.draft([c[0] for c in chosen], shapes, torch.tensor([c[2] for c in chosen]),
                             roots.hidden[index], roots.logprobs[index])
        for b, (req_id, _, _) in enumerate(chosen):
            part = tree.request(b)
            self.proposed[req_id] = ProposedTree(part.tokens.tolist(), part.parents.tolist(),
                                                 part.depths.tolist(), str(shapes[b]))
            self.decisions.update(f"{self.proposed[req_id].tokens}{self.proposed[req_id].parents}".encode())
        return [self.proposed[r].tokens[1:] if r in self.proposed else [] for r in req_ids]

    @functools.cached_property
    def trees_supported(self) -> bool:
        """Whether tree attention can read this engine's KV cache layout (`cpu_paged_kv`); if
        not (e.g. an ISA respsp does not know), every tree is drafted as a chain of its depth,
        which vLLM's own causal attention verifies, and each is counted as a fallback."""
        unknown = sorted(_attention_isas(self.runner) - set(SUPPORTED_ISAS))
        if os.environ.get(FAULT_ENV) == "unsupported_kv_layout":
            unknown = ["(fault injected)"]
        if unknown:
            logger.warning("respsp: tree attention cannot read the KV cache layout(s) %s (it reads "
                           "%s); trees are drafted as chains", unknown, list(SUPPORTED_ISAS))
        return not unknown

    def _upstream_reason(self, scheduler_output, req_ids) -> str | None:
        if scheduler_output.has_structured_output_requests:
            return "structured_outputs"
        for req_id in req_ids:
            params = self.runner.requests[req_id].sampling_params
            reason = upstream_reason(params) if params is not None else None
            if reason:
                return reason
        return None

    def _fallback(self, kind: str, count: int = 1) -> None:
        """Count a safety net that fired (stats file; the Prometheus counter)."""
        self.fallbacks[kind] += count
        metrics.record_fallback(kind, count)

    def stats(self) -> dict:
        return {"steps": self.steps, "shapes": dict(self.shape_counts), "fallbacks": dict(self.fallbacks),
                "tensor_parallel_rank": self.rank, "decisions_digest": self.decisions.hexdigest()[:16],
                "recomputed_requests": self.recomputed, "prefix_cached_requests": self.prefix_cached,
                "live_draft_contexts": len(self._drafter.contexts) if self._drafter else 0,
                "live_proposed_trees": len(self.proposed),
                "live_policy_holds": self.choose.live_holds,
                "seconds": {k: round(v, 4) for k, v in SECONDS.items()},
                "scheduled_drafts": {shape: dict(c) for shape, c in self.scheduled.items()},
                "config": self.config.to_dict()}

    def _write_stats(self) -> None:
        path = os.environ.get(STATS_ENV)
        if path:
            path = path if self.rank == 0 else f"{path}.rank{self.rank}"
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(self.stats(), f)
            os.replace(tmp, path)


def _attention_isas(runner) -> set[str]:
    """The KV layouts (CPU attention ISAs) of the target's attention layers."""
    try:
        layers = runner.vllm_config.compilation_config.static_forward_context.values()
    except AttributeError:  # a runner built outside vLLM (unit tests)
        return set()
    return {layer.isa for layer in layers if isinstance(getattr(layer, "isa", None), str)}


def _tensor_parallel_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # no distributed state (unit tests, a runner built outside vLLM)
        return 0
