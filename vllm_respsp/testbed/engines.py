"""Engines that stay up side by side, one process each, so a benchmark can interleave them.

Each `EngineWorker` is a process holding one vLLM `LLM` (one speculative configuration). The
benchmark sends it a batch of prompts, it generates and returns the measured `RunResult`.
Keeping every configuration loaded lets repetitions alternate between them, so the machine's
noise lands on all of them alike instead of on whichever ran during a busy minute.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from dataclasses import dataclass, field


@dataclass
class EngineConfig:
    """One column of the benchmark: a name and the `LLM(...)` arguments that differ."""

    name: str
    speculative_config: dict | None = None
    engine: dict = field(default_factory=dict)

    def describe(self) -> str:
        spec = self.speculative_config
        if not spec:
            return "no speculation"
        if spec.get("method") == "eagle3" and spec.get("num_speculative_tokens_per_batch_size"):
            return "EAGLE-3, K by batch size"
        if spec.get("method") == "eagle3":
            return f"EAGLE-3 chain of {spec['num_speculative_tokens']}"
        if spec.get("method") == "respsp" and "shape" in spec and spec.get("policy", "static") == "static":
            from vllm_respsp.tree.shape import TreeShape

            return f"respsp {TreeShape.from_dict(spec['shape'])}"
        if spec.get("method") == "respsp" and spec.get("policy") not in (None, "static", "cycle"):
            from pathlib import Path

            policy = Path(spec["policy"])
            schedule = " (measured schedule)" if spec.get("schedule") == "measured" else ""
            return f"respsp policy {policy.parent.name}/{policy.stem}{schedule}"
        return str(spec)


def reference_engine(engine: dict) -> dict:
    """The no-speculation column's engine arguments: reporting raw logits as logprobs changes no
    generated token and lets the lossless check (`lossless.judge`) read the target's logits."""
    return {**engine, "logprobs_mode": "raw_logits"}


def _serve(conn, model: str, config: EngineConfig) -> None:
    import os

    # The engine runs inside this worker process: one process per configuration, no extra hop.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        from vllm_respsp.testbed.engine_run import generate, make_llm

        llm = make_llm(model, config.speculative_config, **config.engine)
        tokenizer = llm.get_tokenizer()
        conn.send(("ready", None))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        message = conn.recv()
        if message is None:
            return
        kind, payload = message
        try:
            if kind == "render":
                from vllm_respsp.testbed.prompts import render

                conn.send(("ok", render(payload, tokenizer)))
            elif kind == "top_logits":
                from vllm_respsp.testbed.engine_run import top_logits

                conn.send(("ok", top_logits(llm, *payload)))
            else:
                prompts, sampling, fresh_prefix_cache, max_in_flight = payload
                if fresh_prefix_cache:
                    llm.reset_prefix_cache()
                conn.send(("ok", generate(llm, prompts, sampling, max_in_flight=max_in_flight).to_json()))
        except Exception:
            conn.send(("error", traceback.format_exc()))


WARM_UP_TOKENS = 16


def warm_up(workers, prompts: list, sampling: dict) -> None:
    """One short untimed batch per engine: an engine's first batch of a size is slower."""
    for worker in workers:
        worker.generate(prompts, {**sampling, "max_tokens": WARM_UP_TOKENS})


BATCHING = ("static", "continuous")


def generate_in_batches(worker, prompts: list, batch_size: int, sampling: dict,
                        batching: str = "static") -> list[dict]:
    """One timed pass over `prompts`, `batch_size` at a time: "static", in groups of
    `batch_size` (the next group starts when the whole group has finished), or "continuous",
    all queued with at most `batch_size` unfinished (a request's slot goes to the next prompt
    when it finishes, as in serving or vLLM's offline benchmark with max_num_seqs). The pass
    starts from an empty prefix cache: earlier passes over the same prompts must not let this
    one skip prefill they paid; hits within the pass (prompts that share a start) still count."""
    if batching not in BATCHING:
        raise ValueError(f"batching={batching!r}: allowed values are {list(BATCHING)}")
    if batching == "continuous":
        return [worker.generate(prompts, sampling, fresh_prefix_cache=True, max_in_flight=batch_size)]
    return [worker.generate(prompts[i:i + batch_size], sampling, fresh_prefix_cache=i == 0)
            for i in range(0, len(prompts), batch_size)]


class EngineWorker:
    def __init__(self, model: str, config: EngineConfig, kv_cache_gib: int = 1):
        from vllm_respsp.testbed.engine_run import prepare_cpu_env

        # Before the spawn: LD_PRELOAD (Intel OpenMP) only reaches processes started after it.
        prepare_cpu_env(kv_cache_gib)
        self.config = config
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, model, config), daemon=False)
        self._proc.start()

    def wait_ready(self) -> None:
        self._reply()

    def _reply(self):
        kind, payload = self._conn.recv()
        if kind == "error":
            raise RuntimeError(f"engine '{self.config.name}' failed:\n{payload}")
        return payload

    def render(self, prompts) -> list[str]:
        self._conn.send(("render", prompts))
        return self._reply()

    def top_logits(self, contexts: list[list[int]], k: int) -> list[dict[int, float]]:
        """The engine's top-k raw logits after each context (an engine with
        logprobs_mode="raw_logits", see `reference_engine`)."""
        self._conn.send(("top_logits", (contexts, k)))
        return self._reply()

    def generate(self, prompts: list, sampling: dict, fresh_prefix_cache: bool = False,
                 max_in_flight: int | None = None) -> dict:
        """One `engine_run.generate` (at most `max_in_flight` requests unfinished at a time, if
        given); `fresh_prefix_cache` empties vLLM's prefix cache first, so what earlier calls
        left there (the same prompts, in a benchmark's repetitions) is not reused."""
        self._conn.send(("generate", (prompts, sampling, fresh_prefix_cache, max_in_flight)))
        return self._reply()

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(timeout=60)
            if self._proc.is_alive():
                self._proc.terminate()
