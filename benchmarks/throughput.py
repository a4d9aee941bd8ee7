"""Offline throughput, every configuration side by side in one run.

    python -m benchmarks.throughput --quick                  # < 5 minutes on the 2-core CPU
    python -m benchmarks.throughput --prompt-sets mt-bench humaneval --batch-sizes 1 4 16
    python -m benchmarks.throughput --batch-sizes 4 --batching static continuous

A batch size B runs the prompts in groups of B, each to its end ("static", the default), or all
queued with B in flight ("continuous": a finished request's slot goes to the next prompt, as in
a server or vLLM's offline benchmark with max_num_seqs = B); static groups end with a tail at
loads below B, which drafting lengthens.

All configurations (no speculation, vLLM's EAGLE-3 chain for each length in --chains, ...)
stay loaded in their own processes; each repetition runs every configuration on the same
prompts, in a rotated order, so machine noise hits all of them alike. `--engines-per-config N`
starts N engines of each configuration, all run every repetition, their samples pooled (each
sample names its engine): on a machine where two engines of one configuration differ by a few
percent, that difference averages out instead of landing on one column. Reported per prompt set
and batch size: median output tokens/s with min-max spread, time per output token, vLLM's
acceptance length and per-position acceptance, speedups against no speculation and against
the best EAGLE-3 chain, and whether the outputs are the target's own: "identical" to no
speculation token for token, "equal up to N near-ties" (bf16 only: where outputs part, the
target's own logits without speculation have the two tokens within a few bf16 steps,
`vllm_respsp.testbed.lossless`), or "MISMATCH", which fails the run after its results are
written. Writes JSON (with every raw sample), a Markdown table and PNG plots into --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

from benchmarks.harness import machine_info, model_and_head, results_folder, unwinding_on_signals
from vllm_respsp.config import SCHEDULES
from vllm_respsp.testbed.engines import (
    BATCHING,
    EngineConfig,
    EngineWorker,
    generate_in_batches,
    reference_engine,
    warm_up,
)
from vllm_respsp.testbed.lossless import TOP_LOGITS, judge


def engine_configs(head: str | None, chains: list[int], engine: dict,
                   respsp_shapes: list[str] = (), policies: list[str] = (),
                   policy_shape: str = "chain3", schedules: list[str] = ("policy",)) -> list[EngineConfig]:
    from benchmarks.tree_shapes import parse_shape

    configs = [EngineConfig("none", None, reference_engine(engine))]
    for n in chains if head else []:
        configs.append(EngineConfig(f"eagle3-{n}", {"method": "eagle3", "model": head,
                                                     "num_speculative_tokens": n}, engine))
    for shape in respsp_shapes if head else []:
        configs.append(EngineConfig(f"respsp-{shape}", {"method": "respsp", "model": head,
                                                         "shape": parse_shape(shape)}, engine))
    for policy, schedule in itertools.product(policies if head else [], schedules):
        measured = {} if schedule == "policy" else {"schedule": schedule}
        name = f"respsp-policy-{policy_label(policy, policies)}" + (f"-{schedule}" if measured else "")
        configs.append(EngineConfig(name, {
            "method": "respsp", "model": head, "shape": parse_shape(policy_shape),
            "policy": str(Path(policy).resolve()), **measured}, engine))
    names = [c.name for c in configs]
    if len(set(names)) < len(names):
        raise ValueError(f"two columns would share a name (one would replace the other's figures): {names}")
    return configs


def policy_label(policy: str, policies: list[str]) -> str:
    """A policy column's name: its file's stem, with its folder where another file has the same
    stem (every shipped policy is a bandit.json)."""
    stem = Path(policy).stem
    if sum(Path(p).stem == stem for p in policies) > 1:
        return f"{Path(policy).parent.name}-{stem}"
    return stem


def parse_k_schedule(text: str) -> list[list[int]]:
    """"1-2:3,3-1024:0" -> [[1, 2, 3], [3, 1024, 0]] (vLLM's num_speculative_tokens_per_batch_size).
    Raises ValueError naming the part that is not START-END:K (or START:K) with 1 <= START <= END, K >= 0."""
    rows = []
    for part in text.split(","):
        span, _, k = part.partition(":")
        start, _, end = span.partition("-")
        try:
            row = [int(start), int(end or start), int(k)]
        except ValueError:
            row = None
        if row is None or not 1 <= row[0] <= row[1] or row[2] < 0:
            raise ValueError(f"K-by-batch schedule {text!r}: part {part!r} is not START-END:K "
                             "(batch sizes 1 <= START <= END, K >= 0), e.g. '1-2:3,3-1024:0'")
        rows.append(row)
    return rows


def schedule_from_best(best_k: dict[int, int], max_batch: int) -> list[list[int]]:
    """Ranges of batch sizes, each given the K that was fastest at the measured batch size it
    starts with: {1: 3, 4: 2, 16: 0} -> [[1, 3, 3], [4, 15, 2], [16, max_batch, 0]]."""
    sizes = sorted(best_k)
    ends = [s - 1 for s in sizes[1:]] + [max(max_batch, sizes[-1])]
    return [[1 if i == 0 else s, e, best_k[s]] for i, (s, e) in enumerate(zip(sizes, ends))]


def k_by_batch_config(head: str, schedule: list[list[int]], engine: dict) -> EngineConfig:
    return EngineConfig("eagle3-k-by-batch", {
        "method": "eagle3", "model": head, "num_speculative_tokens": max(1, max(k for *_, k in schedule)),
        "num_speculative_tokens_per_batch_size": schedule}, engine)


class _Quiet:
    def update(self, n: int) -> None:
        pass


def tune_k_schedule(workers: list[EngineWorker], texts: list[str], batch_sizes: list[int],
                    sampling: dict, batching: str = "static") -> tuple[list[list[int]], dict]:
    """vLLM's K-by-batch-size schedule tuned on this machine from the run's own fixed-K columns
    (no speculation is K = 0): one repetition per batch size, the fastest K wins."""
    fixed = [w for w in workers if w.config.name == "none" or
             (w.config.name.startswith("eagle3-") and w.config.name[7:].isdigit())]
    rates, best_k = {}, {}
    for batch_size in batch_sizes:
        samples = run_cell(fixed, texts, batch_size, sampling, 1, _Quiet(), batching)
        rates[batch_size] = {name: s[0]["output_tokens"] / s[0]["seconds"] for name, s in samples.items()}
        best = max(rates[batch_size], key=rates[batch_size].get)
        best_k[batch_size] = 0 if best == "none" else int(best[len("eagle3-"):])
    return schedule_from_best(best_k, max(batch_sizes) * 4), {"tokens_per_s": rates, "best_k": best_k}


def add_lists(a: list[int], b: list[int]) -> list[int]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]


def batches(prompts: list, batch_size: int) -> list[list]:
    return [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]


def add_counts(total: dict[str, int], more: dict[str, int]) -> None:
    """Add per-label counts (fallbacks by kind, steps by mode) into `total`."""
    for label, n in more.items():
        total[label] = total.get(label, 0) + n


def run_cell(workers: list[EngineWorker], texts: list[str], batch_size: int, sampling: dict,
             reps: int, progress, batching: str = "static") -> dict[str, list[dict]]:
    """All repetitions of one (prompt set, batching, batch size) cell: {config name: [sample, ...]}.

    Every engine first runs one untimed batch of this size, and every repetition starts from an
    empty prefix cache (`generate_in_batches`): the same prompts run in every repetition and in
    the K-by-batch tuning."""
    warm_up(workers, texts[:batch_size], sampling)
    samples: dict[str, list[dict]] = {w.config.name: [] for w in workers}
    engine_of = replica_numbers(workers)
    for rep in range(reps):
        order = workers[rep % len(workers):] + workers[:rep % len(workers)]
        for worker in order:
            seconds, tokens, spec = 0.0, 0, {"drafts": 0, "draft_tokens": 0, "accepted_tokens": 0,
                                            "accepted_per_pos": [], "respsp_shape_steps": 0,
                                            "respsp_fallbacks": {}, "respsp_schedule_steps": {}}
            token_ids, prompt_ids, cached = [], [], 0
            for r in generate_in_batches(worker, texts, batch_size, sampling, batching):
                seconds += r["seconds"]
                tokens += r["output_tokens"]
                token_ids += r["token_ids"]
                prompt_ids += r["prompt_token_ids"]
                cached += sum(r["cached_tokens"])
                for key in ("drafts", "draft_tokens", "accepted_tokens", "respsp_shape_steps"):
                    spec[key] += r["spec"].get(key, 0)
                for key in ("respsp_fallbacks", "respsp_schedule_steps"):
                    add_counts(spec[key], r["spec"].get(key, {}))
                spec["accepted_per_pos"] = add_lists(spec["accepted_per_pos"], r["spec"]["accepted_per_pos"])
            samples[worker.config.name].append(
                {"rep": rep, "engine": engine_of[id(worker)], "seconds": seconds, "output_tokens": tokens,
                 "spec": spec, "token_ids": token_ids, "prompt_token_ids": prompt_ids, "cached_prompt_tokens": cached})
            progress.update(1)
    return samples


def replica_numbers(workers: list) -> dict[int, int]:
    """{id(worker): its number among the engines of its configuration} (0, 1, ...): with
    `--engines-per-config N` a configuration's samples pool N engines, each sample says which."""
    seen: dict[str, int] = {}
    numbers = {}
    for worker in workers:
        numbers[id(worker)] = seen.get(worker.config.name, 0)
        seen[worker.config.name] = numbers[id(worker)] + 1
    return numbers


def summarize(samples: list[dict], batch_size: int) -> dict:
    rates = [s["output_tokens"] / s["seconds"] for s in samples]
    drafts = sum(s["spec"]["drafts"] for s in samples)
    accepted = sum(s["spec"]["accepted_tokens"] for s in samples)
    per_pos: list[int] = []
    for s in samples:
        per_pos = add_lists(per_pos, s["spec"]["accepted_per_pos"])
    median = statistics.median(rates)
    steps = sum(s["spec"].get("respsp_shape_steps", 0) for s in samples)
    fallbacks: dict[str, int] = {}
    modes: dict[str, int] = {}
    for s in samples:
        add_counts(fallbacks, s["spec"].get("respsp_fallbacks", {}))
        add_counts(modes, s["spec"].get("respsp_schedule_steps", {}))
    return {
        # respsp's safety nets by kind, and whether they fired on more than 1% of request-steps
        "respsp_fallbacks": fallbacks,
        "respsp_fallbacks_flag": bool(steps) and sum(fallbacks.values()) > 0.01 * steps,
        # engine steps the measured schedule ran in each mode (policy/schedule.py)
        "respsp_schedule_steps": modes,
        "tokens_per_s": median,
        "tokens_per_s_min": min(rates),
        "tokens_per_s_max": max(rates),
        # Wall time per output token of one sequence (batch_size sequences decode together).
        "ms_per_output_token": 1000.0 * batch_size / median,
        "acceptance_length": 1.0 + accepted / drafts if drafts else 1.0,
        "acceptance_per_pos": [a / drafts for a in per_pos] if drafts else [],
    }


def add_identity(cell: dict[str, dict], samples: dict[str, list[dict]], dtype: str = "float32",
                 top_logits=None) -> None:
    """Per configuration: outputs equal to no speculation's, token for token, in every repetition
    ('n/N'), and the lossless verdict of its worst repetition (`lossless.judge`)."""
    reference = samples["none"][0]
    for name, summary in cell.items():
        same = [all(s["token_ids"][i] == reference["token_ids"][i] for s in samples[name])
                for i in range(len(reference["token_ids"]))]
        summary["identical_to_none"] = f"{sum(same)}/{len(same)}"
        verdicts = [judge(reference["token_ids"], s["token_ids"], reference.get("prompt_token_ids") or [],
                          dtype, top_logits) for s in samples[name]]
        worst = min(verdicts, key=lambda v: (v.ok, -len(v.divergences)))
        summary["lossless"] = worst.to_dict()


def add_speedups(cell: dict[str, dict]) -> None:
    base = cell["none"]["tokens_per_s"]
    chains = [v["tokens_per_s"] for k, v in cell.items() if k.startswith("eagle3-")]
    best_chain = max(chains) if chains else None
    for summary in cell.values():
        summary["speedup_vs_none"] = summary["tokens_per_s"] / base
        summary["speedup_vs_best_eagle3"] = summary["tokens_per_s"] / best_chain if best_chain else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, with --quick applied; a bad value is a usage error naming its option."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small run: < 5 minutes on the CPU testbed")
    parser.add_argument("--model", help="target model (default: the testbed SmolLM2-135M-Instruct)")
    parser.add_argument("--head", help="EAGLE-3 head (default: the shipped testbed head, if present)")
    parser.add_argument("--prompt-sets", nargs="+", default=["mt-bench", "humaneval", "gsm8k", "sharegpt-heldout"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--batching", nargs="+", choices=BATCHING, default=["static"],
                        help="static: groups of batch-size prompts, each group to its end; continuous: all "
                             "prompts queued, batch-size in flight (vLLM's offline benchmark, a server); "
                             "both: one cell of each")
    parser.add_argument("--num-prompts", type=int, default=64, help="prompts per set (batched by batch size)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--chains", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--respsp", nargs="*", default=["T4/D2/K2", "T8/D3/K4"],
                        help="respsp static shapes (T<total>/D<depth>/K<top_k> or chainN), one column each")
    parser.add_argument("--policies", nargs="*", default=[],
                        help="respsp policy files, one column each (static fallback shape: --policy-shape)")
    parser.add_argument("--policy-shape", default="chain3", help="the static shape given with a policy file")
    parser.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=["policy"],
                        help="respsp's \"schedule\" for each policy column: the policy alone, the measured "
                             "schedule (policy/schedule.py), or a column of each")
    parser.add_argument("--k-by-batch", default="auto",
                        help="vLLM EAGLE-3 with K chosen by batch size (num_speculative_tokens_per_batch_size): "
                             "'auto' tunes it from this run's fixed-K columns before the run, "
                             "'1-2:3,3-1024:0' gives it, 'none' leaves the column out")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--engines-per-config", type=int, default=1,
                        help="engines started per configuration, each run every repetition (samples pooled): "
                             "two engines of one configuration can differ by a few percent on a noisy machine")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--dtype", default=None, help="model dtype (default: the checkpoint's, bfloat16 "
                                                      "for the testbed); float32 for token-exact outputs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.prompt_sets, args.batch_sizes = ["mt-bench"], [1, 4]
        args.num_prompts, args.max_tokens, args.chains, args.reps = 4, 48, [3, 5], 1
        args.respsp = args.respsp[:1]
    if any(b < 1 for b in args.batch_sizes) or min(args.num_prompts, args.reps, args.engines_per_config) < 1:
        parser.error("--batch-sizes, --num-prompts, --reps and --engines-per-config must be positive")
    if args.k_by_batch not in ("auto", "none"):
        try:
            parse_k_schedule(args.k_by_batch)
        except ValueError as e:
            parser.error(f"--k-by-batch: {e}")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    from tqdm import tqdm

    model, head = model_and_head(args)
    stamp, out = results_folder("throughput", args.out)
    engine = {"max_model_len": args.max_model_len, **({"dtype": args.dtype} if args.dtype else {})}
    configs = engine_configs(head, args.chains, engine, args.respsp, args.policies, args.policy_shape,
                             args.schedules)
    sampling = {"temperature": 0.0, "max_tokens": args.max_tokens, "ignore_eos": False}
    cells, raw, tuning, machine = [], {}, None, None

    def result(complete: bool) -> dict:
        return {
            "command": "python -m benchmarks.throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": stamp, "complete": complete, "machine": machine, "model": model, "head": head,
            "configs": [{"name": c.name, "describe": c.describe(), "speculative_config": c.speculative_config}
                        for c in configs],
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "k_by_batch_tuning": tuning,
            "cells": cells, "raw": raw,
        }

    with unwinding_on_signals():
        workers = [EngineWorker(model, c) for c in configs for _ in range(args.engines_per_config)]
        try:
            for w in tqdm(workers, desc="starting engines"):
                w.wait_ready()
            machine = machine_info()
            if head and args.k_by_batch != "none":
                tuning = start_k_by_batch(args, workers, configs, model, head, engine, sampling)
            total = len(args.prompt_sets) * len(args.batching) * len(args.batch_sizes) * args.reps * len(workers)
            with tqdm(total=total, desc="benchmark", unit="run") as progress:
                for key, samples, cell in measure_cells(args, workers, sampling, progress):
                    cells.append(cell)
                    raw[key] = samples
                    # Finished cells survive an interrupted run (`python -m benchmarks.report DIR`
                    # then writes their table and plots).
                    (out / "throughput.json").write_text(json.dumps(result(False), indent=1, default=str))
        finally:
            for w in workers:
                w.close()

    (out / "throughput.json").write_text(json.dumps(result(True), indent=1, default=str))
    from benchmarks.report import write_report

    write_report(result(True), out)
    print((out / "throughput.md").read_text())
    fail_on_mismatch(cells, out)
    return out


def start_k_by_batch(args, workers: list[EngineWorker], configs: list[EngineConfig], model: str, head: str,
                     engine: dict, sampling: dict) -> dict | None:
    """Add vLLM's K-by-batch-size column: its config to `configs`, its engines (started) to
    `workers`. With `--k-by-batch auto` the schedule is tuned on the fixed-K engines first;
    returns that tuning's figures (None for a given schedule)."""
    from vllm_respsp.testbed.prompts import load_prompts

    tuning = None
    if args.k_by_batch == "auto":
        texts = workers[0].render(load_prompts(args.prompt_sets[0], limit=args.num_prompts))
        schedule, tuning = tune_k_schedule(workers, texts, args.batch_sizes, sampling, args.batching[0])
    else:
        schedule = parse_k_schedule(args.k_by_batch)
    configs.append(k_by_batch_config(head, schedule, engine))
    added = [EngineWorker(model, configs[-1]) for _ in range(args.engines_per_config)]
    workers += added
    for w in added:
        w.wait_ready()
    return tuning


def measure_cells(args, workers: list[EngineWorker], sampling: dict, progress):
    """Every (prompt set, batching, batch size) cell in turn: (its key in the raw samples, its
    samples per configuration, its summary with speedups and the lossless verdicts)."""
    from vllm_respsp.testbed.prompts import load_prompts

    for set_name, batching, batch_size in itertools.product(args.prompt_sets, args.batching, args.batch_sizes):
        texts = workers[0].render(load_prompts(set_name, limit=args.num_prompts))
        samples = run_cell(workers, texts, batch_size, sampling, args.reps, progress, batching)
        cell = {name: summarize(s, batch_size) for name, s in samples.items()}
        add_speedups(cell)
        add_identity(cell, samples, args.dtype or "bfloat16",
                     lambda contexts: workers[0].top_logits(contexts, TOP_LOGITS))
        key = f"{set_name}/bs{batch_size}" + ("" if batching == "static" else f"/{batching}")
        yield key, samples, {"prompt_set": set_name, "batch_size": batch_size, "batching": batching,
                             "num_prompts": len(texts), "configs": cell}


def fail_on_mismatch(cells: list[dict], out: Path) -> None:
    """A run whose outputs are not the target's own (beyond near-ties) fails, its results kept."""
    failed = sorted({f"{c['prompt_set']}/bs{c['batch_size']}/{name}" for c in cells
                     for name, s in c["configs"].items() if not s["lossless"]["ok"]})
    if failed:
        raise SystemExit(f"MISMATCH: outputs that are not the target's own (not near-ties) in {failed}; "
                         f"see {out / 'throughput.json'}")


if __name__ == "__main__":
    main()
