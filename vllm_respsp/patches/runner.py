"""The four seams of vLLM's V1 model runner where respsp runs (CPU runner inherits them).

Each replacement calls the original first or instead, and does nothing unless the engine was
started with `method: "respsp"` (`runtime_of` is None otherwise), so other engines in the same
process are untouched.
"""

from __future__ import annotations

from vllm_respsp import envs
from vllm_respsp.patches.registry import Patch

RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"


def runtime_of(runner):
    """The runner's respsp runtime, created on first use; None when respsp is not configured."""
    runtime = getattr(runner, "_respsp_runtime", None)
    if runtime is None:
        settings = getattr(runner.speculative_config, "respsp", None)
        if not settings:
            return None
        from vllm_respsp.config import parse
        from vllm_respsp.runtime.runtime import RespspRuntime

        runtime = RespspRuntime(runner, parse(settings))
        runner._respsp_runtime = runtime
    return runtime


class RunnerPrepareInputs(Patch):
    """After the step's inputs and slot mappings exist: lay out the trees, fix RoPE positions."""

    name = "runner_prepare_inputs"
    target = RUNNER + "._prepare_inputs"

    def replacement(self, original):
        def _prepare_inputs(runner, scheduler_output, *args, **kwargs):
            result = original(runner, scheduler_output, *args, **kwargs)
            runtime = runtime_of(runner)
            if runtime is not None:
                runtime.on_prepare_inputs(scheduler_output)
            return result

        return _prepare_inputs


class RunnerAttentionMetadata(Patch):
    """Hand the step's trees to the attention layers with the step's own attention metadata
    (dummy and profiling runs build theirs elsewhere and never see a tree)."""

    name = "runner_attention_metadata"
    target = RUNNER + "._build_attention_metadata"

    def replacement(self, original):
        def _build_attention_metadata(runner, *args, **kwargs):
            attn_metadata, spec_metadata = original(runner, *args, **kwargs)
            runtime = runtime_of(runner)
            trees = runtime.step_trees if runtime is not None else None
            if trees is not None:
                groups = attn_metadata if isinstance(attn_metadata, list) else [attn_metadata]
                for by_layer in groups:
                    for metadata in by_layer.values():
                        metadata.respsp_trees = trees
            return attn_metadata, spec_metadata

        return _build_attention_metadata


class RunnerSample(Patch):
    """Verify trees with the tree sampler; chains keep vLLM's rejection sampler; a step in which
    no request has drafts samples as vLLM does without speculation (vLLM's own EAGLE-3 path
    would still run its rejection sampler over zero drafts)."""

    name = "runner_sample"
    target = RUNNER + "._sample"

    def replacement(self, original):
        def _sample(runner, logits, spec_decode_metadata, *args, **kwargs):
            runtime = runtime_of(runner)
            if runtime is not None and spec_decode_metadata is not None and spec_decode_metadata.max_spec_len == 0:
                return original(runner, logits, None, *args, **kwargs)  # one logit row per request
            if runtime is not None:
                output = runtime.sample(logits, spec_decode_metadata, runner.input_batch.sampling_metadata,
                                        lambda: original(runner, logits, spec_decode_metadata, *args, **kwargs))
                if output is not None:
                    return output
            return original(runner, logits, spec_decode_metadata, *args, **kwargs)

        return _sample


class RunnerProposeDrafts(Patch):
    """respsp's tree drafter in place of vLLM's EAGLE-3 chain drafter."""

    name = "runner_propose_drafts"
    target = RUNNER + ".propose_draft_token_ids"

    def replacement(self, original):
        def propose_draft_token_ids(runner, scheduler_output, sampled_token_ids, sampling_metadata,
                                    hidden_states, sample_hidden_states, aux_hidden_states,
                                    *args, **kwargs):
            runtime = runtime_of(runner)
            if runtime is None:
                return original(runner, scheduler_output, sampled_token_ids, sampling_metadata,
                                hidden_states, sample_hidden_states, aux_hidden_states, *args, **kwargs)
            runner._draft_probs = None
            runner._draft_prob_req_ids = None
            return runtime.propose(scheduler_output, sampled_token_ids, aux_hidden_states)

        return propose_draft_token_ids


class RunnerStepClock(Patch):
    """With VLLM_RESPSP_STEP_TIMES=<file>, one line per model step: its start time, requests and
    scheduled tokens. The time from one step's start to the next is one whole engine step
    (schedule, forward, verification, drafting, output); `engine_tools.profile` takes the median over
    the decode steps of a run, which shrugs off a noisy machine's outliers."""

    name = "runner_step_clock"
    target = RUNNER + ".execute_model"

    def applies(self) -> bool:
        return envs.step_times_file() is not None

    def replacement(self, original):
        import time

        path = envs.step_times_file()

        def execute_model(runner, scheduler_output, *args, **kwargs):
            reqs = len(scheduler_output.num_scheduled_tokens)
            if reqs:
                with open(path, "a") as f:
                    f.write(f"{time.perf_counter():.6f} {reqs} {scheduler_output.total_num_scheduled_tokens}\n")
            return original(runner, scheduler_output, *args, **kwargs)

        return execute_model
