"""Where an engine step's time goes, for two or more configurations in one process, interleaved.

    python -m benchmarks.step_phases --batch 8 --reps 4 none held
    python -m benchmarks.step_phases --batch 1 --reps 6 eagle3-3 respsp-chain3 --out FILE.json
    python -m benchmarks.step_phases --batch 4 --batching continuous --num-prompts 16 eagle3-1 respsp-chain1

Configurations: `none` (no speculation), `held` (respsp with a constant NO_DRAFTS policy, whose
load gate is shut at every load: the step a loaded server gets), `policy` (respsp with the
shipped shape policy, whose actions set vLLM's draft slots to its largest shape), `eagle3-K`
(vLLM's EAGLE-3 chain of K) and `respsp-SHAPE` (respsp with one static shape, as
`TreeShape.parse` reads it: `respsp-chain3`, `respsp-T8/D3/K4`); a suffix `@N` starts another engine of the same
configuration (how much two engines of one configuration differ is the noise floor of a
comparison). Every engine runs in this process (vLLM's in-process engine core and executor), so
one set of wrappers times the same vLLM functions in each: the runner's
`execute_model`, `_prepare_inputs`, `_model_forward`, `_sample`, `sample_tokens`,
`propose_draft_token_ids`, `_bookkeeping_sync` and the scheduler's `schedule` and
`update_from_output`, plus respsp's own step-clock phases (`respsp:*`, per engine step).
`step` is the time from one `execute_model` start to the next: the whole engine step. Medians
over the decode steps at full load, in ms: steps whose schedule holds `--batch` requests and no
prompt tokens (the first 8 steps and the last 2 of each run are dropped); the respsp phases are
per such step too. `run` is the median wall time of a whole `generate` (prefill included), in ms;
`step_and_run_by_rep` has both per repetition (an engine's own offset against the machine's drift).
Equal drafts take equal numbers of decode steps (`decode_steps`): vLLM's acceptance counters are
process-wide, so with every engine in one process they cannot be read per engine.
`--batching continuous` keeps `--batch` requests in flight over `--num-prompts` prompts (a
finished request's slot goes to the next prompt, as a server sees) instead of one batch.
MT-Bench prompts, greedy, 64 tokens (`--max-tokens`), the shipped head, bf16. Repetitions alternate the order
of the engines, so slow drifts hit them alike. Not a throughput benchmark (benchmarks.throughput
is): it answers which part of a step a configuration adds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

WRAPPED = {
    "runner": ("execute_model", "sample_tokens", "propose_draft_token_ids", "_prepare_inputs",
               "_model_forward", "_sample", "_bookkeeping_sync"),
    "scheduler": ("schedule", "update_from_output"),
}


def speculative_config(name: str, head: str, policy_dir: Path) -> dict | None:
    from vllm_respsp.policy.policy_file import constant_policy
    from vllm_respsp.tree.shape import NO_DRAFTS, ShapeError, TreeShape, chain

    name = name.partition("@")[0]  # "eagle3-1@2": a second engine of the same configuration
    if name == "none":
        return None
    if name == "held":
        policy = constant_policy(policy_dir / "no-drafts", NO_DRAFTS, chain(1))
        return {"method": "respsp", "model": head, "shape": chain(1).to_dict(), "policy": str(policy)}
    if name == "policy":
        from vllm_respsp.policy.shipped import shipped_policy

        return {"method": "respsp", "model": head, "shape": chain(3).to_dict(), "policy": str(shipped_policy().path)}
    k = name.removeprefix("eagle3-")
    if k != name and k.isdigit():
        return {"method": "eagle3", "model": head, "num_speculative_tokens": int(k)}
    if name.startswith("respsp-"):
        try:
            return {"method": "respsp", "model": head, "shape": TreeShape.parse(name.removeprefix("respsp-")).to_dict()}
        except ShapeError as error:
            raise SystemExit(f"configuration {name!r}: {error}") from None
    raise SystemExit(f"configuration {name!r}: allowed are none, held, policy, eagle3-K and respsp-SHAPE "
                     "(respsp-chainK, respsp-T8/D3/K4)")


class CallLog:
    """(function, start, end) of every wrapped call, process-wide; per engine step, whether its
    schedule was a pure decode step of how many requests, and respsp's step clock at its start."""

    def __init__(self):
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        self.calls: list[tuple[str, float, float]] = []
        self.decode_loads: list[int] = []  # per schedule: requests of a decode-only step, 0 otherwise
        self.clocks: list[dict[str, float]] = []  # respsp's SECONDS at each execute_model start
        for cls, names in ((GPUModelRunner, WRAPPED["runner"]), (Scheduler, WRAPPED["scheduler"])):
            for name in names:
                if hasattr(cls, name):
                    setattr(cls, name, self._timed(name, getattr(cls, name)))

    def clear(self) -> None:
        self.calls.clear()
        self.decode_loads.clear()
        self.clocks.clear()

    def _timed(self, name, original):
        from vllm_respsp.step_clock import SECONDS

        def call(*args, **kwargs):
            if name == "execute_model":
                self.clocks.append(dict(SECONDS))
            start = time.perf_counter()
            out = None
            try:
                out = original(*args, **kwargs)
                return out
            finally:
                self.calls.append((name, start, time.perf_counter()))
                if name == "schedule" and out is not None:
                    self.decode_loads.append(_decode_load(out))
        return call

    def decode_steps(self, load: int) -> list[tuple[int, float, float]]:
        """(step number, start, end) of the decode steps of `load` requests."""
        starts = [start for name, start, _ in self.calls if name == "execute_model"]
        steps = [(i, a, b) for i, (a, b) in enumerate(zip(starts, starts[1:]))][8:-2]
        return [(i, a, b) for i, a, b in steps if i < len(self.decode_loads) and self.decode_loads[i] == load]


def _decode_load(scheduler_output) -> int:
    """The number of requests of a step that schedules no prompt tokens (0 if it does): every
    request runs its one verified token plus its drafts."""
    spec = scheduler_output.scheduled_spec_decode_tokens
    counts = scheduler_output.num_scheduled_tokens
    if scheduler_output.scheduled_new_reqs or any(n > 1 + len(spec.get(r, ())) for r, n in counts.items()):
        return 0
    return len(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+",
                        help="none, held, policy, eagle3-K, respsp-SHAPE (respsp-chain3, respsp-T8/D3/K4)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batching", choices=("static", "continuous"), default="static",
                        help="one batch of --batch prompts, or --batch requests in flight over --num-prompts")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="prompts per run with --batching continuous (default: 4 x --batch)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table as JSON")
    args = parser.parse_args()

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engines in this process: one set of wrappers
    from vllm_respsp.testbed.engine_run import prepare_cpu_env

    prepare_cpu_env(2)
    from vllm_respsp.draft.evaluate import prompt_token_ids
    from vllm_respsp.testbed.model import testbed_model_path

    engines = start_engines(args.configs)
    continuous = args.batching == "continuous"
    num_prompts = (args.num_prompts or 4 * args.batch) if continuous else args.batch
    prompts = prompt_token_ids("mt-bench", testbed_model_path(), num_prompts)
    samples, by_rep = measure(engines, prompts, args)
    table = {name: {key: round(statistics.median(values) * 1000, 3) for key, values in rows.items()}
             | {"decode_steps": len(rows.get("step", [])), "step_and_run_by_rep": by_rep[name]}
             for name, rows in samples.items()}
    table["command"] = "python -m benchmarks.step_phases " + " ".join(
        [*args.configs, f"--batch {args.batch}", f"--reps {args.reps}", f"--max-tokens {args.max_tokens}",
         f"--batching {args.batching}"] + ([f"--num-prompts {num_prompts}"] if continuous else []))
    text = json.dumps(table, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


def start_engines(names: list[str]) -> dict:
    """One in-process bf16 engine per configuration name (`speculative_config`)."""
    import tempfile

    from vllm_respsp.draft import shipped_head_path
    from vllm_respsp.testbed.engine_run import make_llm
    from vllm_respsp.testbed.model import testbed_model_path

    model, head = str(testbed_model_path()), str(shipped_head_path())
    policy_dir = Path(tempfile.mkdtemp(prefix="step-phases-"))
    specs = {name: speculative_config(name, head, policy_dir) for name in names}
    return {name: make_llm(model, spec, distributed_executor_backend="uni", dtype="bfloat16")
            for name, spec in specs.items()}


def measure(engines: dict, prompts: list, args) -> tuple[dict, dict]:
    """Every engine runs the prompts each repetition (order alternating). Returns the samples
    (engine -> "run", "step", each wrapped call, "respsp:<phase>" -> seconds) and, per
    repetition in the order run, (decode-step median, run) in ms, to tell an engine's own
    offset from the machine's drift."""
    from vllm_respsp.step_clock import SECONDS
    from vllm_respsp.testbed.engine_run import generate

    log = CallLog()
    continuous = args.batching == "continuous"
    for llm in engines.values():
        generate(llm, prompts[:2], {"temperature": 0.0, "max_tokens": 8})
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in engines}
    by_rep: dict[str, list[list[float]]] = {name: [] for name in engines}
    for rep in range(args.reps):
        order = list(engines) if rep % 2 == 0 else list(reversed(engines))
        for name in order:
            log.clear()
            started = time.perf_counter()
            sampling = {"temperature": 0.0, "max_tokens": args.max_tokens, "ignore_eos": True}
            generate(engines[name], prompts, sampling, max_in_flight=args.batch if continuous else None)
            samples[name].setdefault("run", []).append(time.perf_counter() - started)
            log.clocks.append(dict(SECONDS))
            steps = log.decode_steps(args.batch)
            by_rep[name].append([round(statistics.median([b - a for _, a, b in steps]) * 1000, 3) if steps else None,
                                 round(samples[name]["run"][-1] * 1000, 1)])
            add_step_samples(samples[name], log, steps)
    return samples, by_rep


def add_step_samples(rows: dict[str, list[float]], log: CallLog, steps) -> None:
    """Per decode step of the run just logged: its seconds, those of the wrapped calls that
    started in it, and each respsp phase's (the step clock's difference across it)."""
    for i, a, b in steps:
        rows.setdefault("step", []).append(b - a)
        for call, start, end in log.calls:
            if a <= start < b:
                rows.setdefault(call, []).append(end - start)
        for phase, seconds in log.clocks[i + 1].items():
            rows.setdefault(f"respsp:{phase}", []).append(seconds - log.clocks[i].get(phase, 0))


if __name__ == "__main__":
    main()
