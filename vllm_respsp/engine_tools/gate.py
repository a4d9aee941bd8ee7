"""A policy's load gate measured in the engine: the largest batch load at which the policy, run
end to end, beats no speculation.

    python -m vllm_respsp.engine_tools.gate --policy vllm_respsp/assets/policy/smollm2-135m-cpu/bandit.json

The simulator's gate (`simulator.draft_load_limit`, written by `policy.train`) prices steps with
the cost profile: median decode steps at a few loads. A whole run pays more than that when it
drafts (the head catching prompts up during prefill, steps of a batch that drains, the
scheduler's work for drafts), and on this CPU the simulated gate let the policy draft at batch
4-16, where it ran at 0.80-0.91x no speculation (benchmarks/results/throughput-20261206a).

So this stage measures. For each load, walked upward, two engines run the same prompts side by
side in batches of that load, interleaved, each repetition from an empty prefix cache: the
policy with its gate open and no speculation. The gate is the largest load up to which the
policy is faster by more than `--margin` at every load (0 when it is not even at the first);
it never opens the gate wider than the simulator's. The prompts are ShareGPT training prompts
from the slice `make policy` records its training traces from, never an evaluation set. The
policy file's `max_draft_load` is rewritten in place; the figures go to `<policy>.gate.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from vllm_respsp.testbed.engines import EngineConfig, EngineWorker, generate_in_batches, warm_up

DEFAULT_LOADS = (1, 2, 4, 8, 16, 32, 64)


def measured_limit(ratios: dict[int, float], margin: float) -> int:
    """The largest load, walked upward, up to which every ratio (policy / no speculation)
    exceeds 1 + margin; 0 when the first does not."""
    limit = 0
    for load in sorted(ratios):
        if ratios[load] <= 1 + margin:
            break
        limit = load
    return limit


def combined_gate(simulated: int | None, measured: int, loads_tried: list[int]) -> int | None:
    """The gate to ship (None: no gate): the measured one, never wider than the simulator's;
    the simulator's where the policy paid at every load tried (nothing measured above them)."""
    if measured >= max(loads_tried):
        return simulated
    return measured if simulated is None else min(simulated, measured)


def open_gate_copy(policy: Path, folder: Path) -> Path:
    """A copy of the policy file (and its weights) with no load gate."""
    meta = json.loads(policy.read_text())
    meta.pop("max_draft_load", None)
    shutil.copy(policy.parent / meta["weights"]["file"], folder / meta["weights"]["file"])
    copy = folder / policy.name
    copy.write_text(json.dumps(meta, indent=1))
    return copy


def rate(worker, prompts: list, load: int, sampling: dict) -> float:
    """Output tokens/s over `prompts` in batches of `load`, from an empty prefix cache."""
    runs = generate_in_batches(worker, prompts, load, sampling)
    return sum(r["output_tokens"] for r in runs) / sum(r["seconds"] for r in runs)


def measure(workers: dict, pool: list, loads: list[int], args, bar) -> dict[int, dict]:
    """{load: {policy and no-speculation tokens/s per repetition, ratio of medians}}, walking
    the loads upward until the policy stops paying."""
    sampling = {"temperature": 0.0, "max_tokens": args.max_tokens}
    rows: dict[int, dict] = {}
    for load in loads:
        prompts = pool[:max(load, args.min_prompts)]
        warm_up(workers.values(), prompts[:load], sampling)
        rates: dict[str, list[float]] = {name: [] for name in workers}
        for rep in range(args.reps):
            for name in (list(workers) if rep % 2 == 0 else list(workers)[::-1]):
                rates[name].append(rate(workers[name], prompts, load, sampling))
                bar.update(1)
        ratio = statistics.median(rates["policy"]) / statistics.median(rates["none"])
        rows[load] = {"prompts": len(prompts), "tokens_per_s": rates, "ratio": ratio}
        bar.write(f"load {load}: policy / no speculation = {ratio:.3f}")
        if ratio <= 1 + args.margin:
            break
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", type=Path, required=True, help="policy file to gate (rewritten in place)")
    ap.add_argument("--loads", nargs="+", type=int, default=list(DEFAULT_LOADS))
    ap.add_argument("--min-prompts", type=int, default=8, help="prompts per load (at least the load)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--margin", type=float, default=0.03,
                    help="the policy must beat no speculation by more than this share to draft at a load")
    ap.add_argument("--static-shape", default="chain3", help="the static shape given with the policy")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--skip", type=int, default=4000, help="ShareGPT-train prompts to skip first")
    ap.add_argument("--context", type=int, default=256, help="longest prompt, in tokens")
    ap.add_argument("--dry-run", action="store_true", help="measure and report, leave the policy file")
    args = ap.parse_args(argv)
    if any(x < 1 for x in args.loads) or args.reps < 1 or args.min_prompts < 1:
        ap.error("--loads, --reps and --min-prompts must be positive")
    from tqdm import tqdm

    from vllm_respsp.draft import shipped_head_path
    from vllm_respsp.engine_tools.profile import prompt_pool
    from vllm_respsp.policy.policy_file import load_policy
    from vllm_respsp.testbed.model import testbed_model_path
    from vllm_respsp.tree.shape import TreeShape

    simulated = load_policy(args.policy).max_draft_load
    loads = sorted(set(args.loads))
    model = str(testbed_model_path())
    pool = prompt_pool("sharegpt-train", args.skip, args.context, max(max(loads), args.min_prompts), model)
    engine = {"dtype": args.dtype, "max_num_seqs": max(loads)}
    with tempfile.TemporaryDirectory() as tmp:
        open_policy = open_gate_copy(args.policy, Path(tmp))
        spec = {"method": "respsp", "model": str(shipped_head_path()), "policy": str(open_policy),
                "shape": TreeShape.parse(args.static_shape).to_dict()}
        workers = {"none": EngineWorker(model, EngineConfig("none", None, engine)),
                   "policy": EngineWorker(model, EngineConfig("policy", spec, engine))}
        try:
            for w in workers.values():
                w.wait_ready()
            with tqdm(total=len(loads) * args.reps * 2, desc="gate", unit="run") as bar:
                rows = measure(workers, pool, loads, args, bar)
        finally:
            for w in workers.values():
                w.close()
    ratios = {load: row["ratio"] for load, row in rows.items()}
    measured = measured_limit(ratios, args.margin)
    gate = combined_gate(simulated, measured, loads)
    report = {"command": "python -m vllm_respsp.engine_tools.gate " + " ".join(argv or []),
              "policy": str(args.policy), "simulated_max_draft_load": simulated, "measured_max_draft_load": measured,
              "max_draft_load": gate, "margin": args.margin, "settings": {k: str(v) for k, v in vars(args).items()},
              "loads": {str(k): v for k, v in rows.items()}}
    Path(f"{args.policy.with_suffix('')}.gate.json").write_text(json.dumps(report, indent=1) + "\n")
    if not args.dry_run:
        set_max_draft_load(args.policy, gate)
    print(f"max_draft_load: {gate} (simulated {simulated}, measured {measured})")
    return report


def set_max_draft_load(policy: Path, gate: int | None) -> None:
    meta = json.loads(policy.read_text())
    meta.pop("max_draft_load", None)
    if gate is not None:
        meta["max_draft_load"] = gate
    policy.write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
