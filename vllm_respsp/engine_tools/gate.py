"""A policy's load gate measured in the engine: the largest batch load at which drafting (the
policy, or one static chain for every request), run end to end, beats no speculation; and the
loads below it where a static chain does as well as the policy (a near tie goes to the chain).

    python -m vllm_respsp.engine_tools.gate --policy vllm_respsp/assets/policy/smollm2-135m-cpu/bandit.json

The simulator's gate (`simulator.draft_load_limit`, written by `policy.train`) prices steps with
the cost profile: median decode steps at a few loads. A whole run pays more than that when it
drafts (the head catching prompts up during prefill, steps of a batch that drains, the
scheduler's work for drafts), and on this CPU the simulated gate let the policy draft at batch
4-16, where it ran at 0.80-0.91x no speculation (benchmarks/results/throughput-20261206a).

So this stage measures. For each load, walked upward, engines run the same prompts side by
side with that load in flight (`--batching`), interleaved, each repetition from an empty prefix
cache: the policy with its gate open, no speculation, and the chains below. The gate is the
largest load up to which the fastest drafting mode is faster by more than `--margin` at every
load (0 when it is not even at the first);
it never opens the gate wider than the simulator's. The prompts are ShareGPT training prompts
from the slice `make policy` records its training traces from, never an evaluation set. The
policy file's `max_draft_load` and `static_loads` are rewritten in place; the figures go to
`<policy>.gate.json`.

Below the gate the policy can still lose to one static shape at some load: on the AVX-512 CPU at
4 in flight vLLM's chain of 1 ran 1.19x no speculation and the policy 1.03x (MT-Bench,
benchmarks/results/throughput-20261206n), although the simulator had them equal there. So
respsp's own chains of `--chains` drafts and any `--shapes` (e.g. a chain verified only where its
draft is likely, chain1/v0.4) run beside them, every request alike, and at each measured load
where the policy does not beat the fastest of them by more than `--margin`, the loads from the
one measured before it up to it get that shape for every request, without the network: the
file's `static_loads` rows (policy_file.LoadShape, like vLLM's K-by-batch-size rows). A near
tie goes to the static shape: the policy drafts deeper, and what deeper drafts earn moves with
the prompts and the machine's state more than a chain does (at 4 in flight on the AVX-512 CPU a
0.8% lead in the gate became 0.95x / 0.89x the chain of 1 on MT-Bench / HumanEval,
benchmarks/results/throughput-20261207). Where the policy ties the best static shape at every
load, the file becomes a measured schedule of static shapes by load (the AVX-512 policy's
`bandit.gate.json` has the figures).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from vllm_respsp.policy.policy_file import LoadShape, beyond_actions, load_policy
from vllm_respsp.testbed.engines import BATCHING, EngineConfig, EngineWorker, generate_in_batches, warm_up
from vllm_respsp.tree.shape import TreeShape, chain

DEFAULT_LOADS = (1, 2, 4, 8, 16, 32, 64)
# the chains a user would pick instead (the best of vLLM's K = 1..5 on the CPUs measured is 1-3)
DEFAULT_CHAINS = (1, 2, 3)
# chains verified only where their drafts are likely: what pays where a verified token costs a
# sizeable share of a step (on the AVX-512 CPU chain1/v0.4 won load 4; chain1/v0.6 tied none at 8)
DEFAULT_SHAPES = ("chain1/v0.4", "chain2/v0.3", "chain1/v0.6")


def measured_limit(ratios: dict[int, float], margin: float) -> int:
    """The largest load, walked upward, up to which every ratio (the load's drafting mode / no
    speculation) exceeds 1 + margin; 0 when the first does not."""
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
    """A copy of the policy file (and its weights) with no load gate and no static loads."""
    meta = json.loads(policy.read_text())
    meta.pop("max_draft_load", None)
    meta.pop("static_loads", None)
    shutil.copy(policy.parent / meta["weights"]["file"], folder / meta["weights"]["file"])
    copy = folder / policy.name
    copy.write_text(json.dumps(meta, indent=1))
    return copy


def rate(worker, prompts: list, load: int, sampling: dict, batching: str) -> float:
    """Output tokens/s over `prompts`, `load` at a time, from an empty prefix cache."""
    runs = generate_in_batches(worker, prompts, load, sampling, batching)
    return sum(r["output_tokens"] for r in runs) / sum(r["seconds"] for r in runs)


def measure(workers: dict, pool: list, loads: list[int], args, bar) -> dict[int, dict]:
    """{load: {tokens/s per worker and repetition, the drafting mode to run ("best": the
    policy, or a chain faster by more than the margin) and its ratio of medians to no
    speculation}}, walking the loads upward until drafting stops paying. `workers`: "none",
    "policy" and the static shapes (`--chains`' "chain<k>", `--shapes` as written)."""
    sampling = {"temperature": 0.0, "max_tokens": args.max_tokens}
    rows: dict[int, dict] = {}
    for load in loads:
        prompts = pool[:max(load, args.min_prompts)]
        warm_up(workers.values(), prompts[:load], sampling)
        rates: dict[str, list[float]] = {name: [] for name in workers}
        for rep in range(args.reps):
            for name in (list(workers) if rep % 2 == 0 else list(workers)[::-1]):
                rates[name].append(rate(workers[name], prompts, load, sampling, args.batching))
                bar.update(1)
        medians = {name: statistics.median(r) for name, r in rates.items()}
        best = fastest_drafting(medians, args.margin)
        ratio = medians[best] / medians["none"]
        rows[load] = {"prompts": len(prompts), "tokens_per_s": rates, "best": best, "ratio": ratio}
        bar.write(f"load {load}: fastest drafting mode {best}, {ratio:.3f}x no speculation")
        if ratio <= 1 + args.margin:
            break
    return rows


def fastest_drafting(medians: dict[str, float], margin: float) -> str:
    """The drafting mode to run at a load: the fastest static shape, unless the policy beats it
    by more than `margin` (module doc: a near tie goes to the static shape, which drafts less)."""
    static = [name for name in medians if name not in ("none", "policy")]
    best_static = max(static, key=medians.get, default=None)
    if best_static is None or medians["policy"] > (1 + margin) * medians[best_static]:
        return "policy"
    return best_static


def static_loads(rows: dict[int, dict], gate: int | None, shapes: dict[str, TreeShape]) -> tuple[LoadShape, ...]:
    """The file's `static_loads` (module doc): each measured load within the gate whose drafting
    mode ("best") is a static shape (`shapes`: worker name -> shape) gives that shape to the
    loads after the previous measured load up to it; neighbouring rows of one shape merge."""
    out: list[LoadShape] = []
    previous, limit = 0, math.inf if gate is None else gate
    for load in sorted(rows):
        shape = shapes.get(rows[load]["best"])
        if shape is not None and previous < limit:
            first = previous + 1
            if out and out[-1].shape == shape and out[-1].last == previous:
                first = out.pop().first
            out.append(LoadShape(first, min(load, limit), shape))
        previous = load
    return tuple(out)


def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", type=Path, required=True, help="policy file to gate (rewritten in place)")
    ap.add_argument("--loads", nargs="+", type=int, default=list(DEFAULT_LOADS))
    ap.add_argument("--min-prompts", type=int, default=8, help="prompts per load (at least the load)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--margin", type=float, default=0.03,
                    help="a drafting mode must beat no speculation, and the policy the fastest static shape, "
                         "by more than this share")
    ap.add_argument("--static-shape", default="chain3", help="the static shape given with the policy")
    ap.add_argument("--chains", nargs="*", type=int, default=list(DEFAULT_CHAINS),
                    help="respsp chains of this many drafts measured beside the policy (static_loads)")
    ap.add_argument("--shapes", nargs="*", default=list(DEFAULT_SHAPES),
                    help="further respsp static shapes measured beside the chains, e.g. chain1/v0.4 "
                         "(a chain of 1 verified only where its draft's probability is >= 0.4)")
    ap.add_argument("--batching", choices=BATCHING, default="continuous",
                    help="static: batches of the load run to their end; continuous: the load in flight")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--skip", type=int, default=4000, help="ShareGPT-train prompts to skip first")
    ap.add_argument("--context", type=int, default=256, help="longest prompt, in tokens")
    ap.add_argument("--dry-run", action="store_true", help="measure and report, leave the policy file")
    args = ap.parse_args(argv)
    if any(x < 1 for x in args.loads + args.chains) or args.reps < 1 or args.min_prompts < 1:
        ap.error("--loads, --chains, --reps and --min-prompts must be positive")
    try:
        args.static_shapes = {f"chain{k}": chain(k) for k in args.chains} | \
            {text: TreeShape.parse(text).validate(f"--shapes {text}") for text in args.shapes}
    except ValueError as e:
        ap.error(str(e))
    if not all(shape.drafts for shape in args.static_shapes.values()):
        ap.error("--shapes: 'none' is measured anyway (no speculation); name drafting shapes")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    policy_file = load_policy(args.policy)
    digest = policy_file.meta["weights"]["sha256"]  # load_policy checked it against the weights
    simulated = simulated_gate(args.policy, policy_file.max_draft_load, digest)
    loads = sorted(set(args.loads))
    shapes = args.static_shapes
    for name, shape in shapes.items():  # before any engine starts: the file must load what it gets
        beyond = beyond_actions(shape, policy_file.actions)
        if beyond:
            sys.exit(f"--chains/--shapes {name}: {beyond}")
    rows = measure_in_engines(args, loads, shapes)
    measured = measured_limit({load: row["ratio"] for load, row in rows.items()}, args.margin)
    gate = combined_gate(simulated, measured, loads)
    rows_static = static_loads(rows, gate, shapes)
    report = {"command": "python -m vllm_respsp.engine_tools.gate "
                         + " ".join(argv if argv is not None else sys.argv[1:]),
              "policy": str(args.policy), "weights_sha256": digest,
              "simulated_max_draft_load": simulated, "measured_max_draft_load": measured,
              "max_draft_load": gate, "static_loads": [r.to_dict() for r in rows_static],
              "margin": args.margin, "settings": {k: str(v) for k, v in vars(args).items()},
              "loads": {str(k): v for k, v in rows.items()}}
    report_path(args.policy).write_text(json.dumps(report, indent=1) + "\n")
    if not args.dry_run:
        write_gate(args.policy, gate, rows_static)
    print(f"max_draft_load: {gate} (simulated {simulated}, measured {measured}); static loads: "
          + (", ".join(f"{r.first}-{r.last} {r.shape}" for r in rows_static) or "none"))
    return report


def measure_in_engines(args, loads: list[int], shapes: dict[str, TreeShape]) -> dict[int, dict]:
    """`measure` on real engines: no speculation, the policy with its gate open (a copy of the
    file) and respsp's static `shapes`, on ShareGPT training prompts."""
    from tqdm import tqdm

    from vllm_respsp.draft import shipped_head_path
    from vllm_respsp.engine_tools.profile import prompt_pool
    from vllm_respsp.testbed.model import testbed_model_path

    model = str(testbed_model_path())
    pool = prompt_pool("sharegpt-train", args.skip, args.context, max(max(loads), args.min_prompts), model)
    engine = {"dtype": args.dtype, "max_num_seqs": max(loads)}
    with tempfile.TemporaryDirectory() as tmp:
        open_policy = open_gate_copy(args.policy, Path(tmp))
        spec = {"method": "respsp", "model": str(shipped_head_path()), "policy": str(open_policy),
                "shape": TreeShape.parse(args.static_shape).to_dict()}
        configs = [EngineConfig("none", None, engine), EngineConfig("policy", spec, engine)] + [
            EngineConfig(name, {**spec, "policy": "static", "shape": shape.to_dict()}, engine)
            for name, shape in shapes.items()]
        workers = {c.name: EngineWorker(model, c) for c in configs}
        try:
            for w in workers.values():
                w.wait_ready()
            with tqdm(total=len(loads) * args.reps * len(workers), desc="gate", unit="run") as bar:
                return measure(workers, pool, loads, args, bar)
        finally:
            for w in workers.values():
                w.close()


def report_path(policy: Path) -> Path:
    """Where the figures of gating `policy` go: beside it, `<stem>.gate.json`."""
    return Path(f"{policy.with_suffix('')}.gate.json")


def simulated_gate(policy: Path, in_file: int | None, digest: str) -> int | None:
    """The simulator's gate: the file's, unless this stage rewrote this very policy (its weights'
    digest) already: a rerun, whose last report kept the simulator's figure."""
    report = report_path(policy)
    if report.is_file():
        previous = json.loads(report.read_text())
        if previous.get("weights_sha256") == digest:
            return previous.get("simulated_max_draft_load")
    return in_file


def write_gate(policy: Path, gate: int | None, rows: tuple[LoadShape, ...] = ()) -> None:
    """Rewrite the policy file's `max_draft_load` and `static_loads` in place."""
    meta = json.loads(policy.read_text())
    for key in ("max_draft_load", "static_loads"):
        meta.pop(key, None)
    if gate is not None:
        meta["max_draft_load"] = gate
    if rows:
        meta["static_loads"] = [r.to_dict() for r in rows]
    policy.write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
