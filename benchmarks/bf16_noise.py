"""How far the target's own bf16 logits move with the batch around a context, without speculation.

    python -m benchmarks.bf16_noise [--num-prompts 80] [--max-tokens 64] [--tag bf16-noise-DATE]

The bf16 lossless verdict (`vllm_respsp.testbed.lossless`) calls a divergence a near-tie when the
two tokens' logits are within `BF16_STEPS` bf16 steps of each other. That tolerance has to cover
what no speculation does to itself: the same context gives different logits in a decode step of a
batch of 80, of a batch of 1, or in a prefill, because the kernels block and reduce differently.
This measures it. One engine (bf16, raw logits as logprobs, no speculation) reads the top logits
of every generated position of the MT-Bench first turns four ways:

- `decode-batch`: greedy decode of all prompts at once (as the benchmarks' reference runs it);
- `decode-alone`: greedy decode of one prompt at a time;
- `prefill-batch`: every context (prompt + the first n reply tokens of `decode-batch`, a few n
  per prompt) prefilled in one call, as the verdict asks for logits;
- `prefill-alone`: the same contexts one at a time.

For each way against `decode-batch`, on the contexts both saw (positions before their outputs
part), it reports how far the decision margin moved: the gap between `decode-batch`'s top two
tokens, re-read in the other way, in bf16 steps at the top logit's magnitude (median, p99, max),
and how often the argmax flipped. Writes JSON and a Markdown table to benchmarks/results/TAG/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
PREFIX_LENGTHS = (0, 8, 24, 48)  # reply tokens before the context's end, for the prefill ways
TOP = 5


def decode_tops(llm, prompts: list[list[int]], max_tokens: int, one_at_a_time: bool):
    """(token ids, [{token: raw logit} per position]) per prompt, greedy, no speculation."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=TOP)
    groups = [[p] for p in prompts] if one_at_a_time else [prompts]
    outs = [o for g in groups for o in llm.generate([{"prompt_token_ids": p} for p in g], params, use_tqdm=False)]
    return [(list(o.outputs[0].token_ids),
             [{int(t): float(lp.logprob) for t, lp in pos.items()} for pos in o.outputs[0].logprobs]) for o in outs]


def prompt_ids(llm, texts: list[str]) -> list[list[int]]:
    """The token ids vLLM itself makes of the rendered prompts (as the benchmarks feed them)."""
    from vllm import SamplingParams

    return [list(o.prompt_token_ids) for o in llm.generate(texts, SamplingParams(max_tokens=1), use_tqdm=False)]


def margin_drift(base: dict[int, float], other: dict[int, float]) -> tuple[float, float, float, bool] | None:
    """(|change of base's top-2 margin| in bf16 steps, the same in logits, the top logit, argmax
    flipped?), None if `other` lacks base's top two."""
    from vllm_respsp.testbed.lossless import bf16_step

    (t1, v1), (t2, v2) = sorted(base.items(), key=lambda kv: -kv[1])[:2]
    if t1 not in other or t2 not in other:
        return None
    moved = abs((v1 - v2) - (other[t1] - other[t2]))
    return moved / bf16_step(v1), moved, v1, other[t2] > other[t1]


def summarize(name: str, pairs: list[tuple[dict, dict]]) -> dict:
    drifts = [d for d in (margin_drift(a, b) for a, b in pairs) if d is not None]
    steps = np.array([d[0] for d in drifts]) if drifts else np.zeros(1)
    worst = sorted(drifts, key=lambda d: -d[0])[:10]
    return {"way": name, "contexts": len(drifts), "median_steps": float(np.median(steps)),
            "p99_steps": float(np.percentile(steps, 99)), "max_steps": float(steps.max()),
            "argmax_flips": sum(d[3] for d in drifts),
            "worst": [{"steps": s, "logits": a, "top_logit": m, "flipped": f} for s, a, m, f in worst]}


def shared_positions(base_tokens: list[int], other_tokens: list[int]) -> int:
    """Positions whose context both runs saw: up to and including the first differing token."""
    same = next((i for i, (a, b) in enumerate(zip(base_tokens, other_tokens)) if a != b),
                min(len(base_tokens), len(other_tokens)))
    return min(same + 1, len(base_tokens), len(other_tokens))


def measure(llm, prompts: list[list[int]], max_tokens: int) -> tuple[list[dict], int]:
    from vllm_respsp.testbed.engine_run import top_logits

    batch = decode_tops(llm, prompts, max_tokens, one_at_a_time=False)
    alone = decode_tops(llm, prompts, max_tokens, one_at_a_time=True)
    decode_pairs = [(b[1][i], a[1][i]) for b, a in zip(batch, alone)
                    for i in range(shared_positions(b[0], a[0]))]
    contexts, bases = [], []
    for p, (tokens, tops) in zip(prompts, batch):
        for n in (n for n in PREFIX_LENGTHS if n < len(tokens)):
            contexts.append(p + tokens[:n])
            bases.append(tops[n])
    prefill_batch = top_logits(llm, contexts, TOP)
    prefill_alone = [top_logits(llm, [c], TOP)[0] for c in contexts]
    rows = [summarize("decode-alone", decode_pairs),
            summarize("prefill-batch", list(zip(bases, prefill_batch))),
            summarize("prefill-alone", list(zip(bases, prefill_alone)))]
    return rows, sum(b[0] != a[0] for b, a in zip(batch, alone))


def write(out: Path, rows: list[dict], diverged: int, args) -> None:
    from vllm_respsp.testbed.lossless import BF16_STEPS, STEP_FLOOR_MAGNITUDE

    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m benchmarks.bf16_noise", *map(shlex.quote, sys.argv[1:])])
    (out / "noise.json").write_text(json.dumps({"command": command, "args": vars(args), "rows": rows,
                                                "decode_alone_outputs_differ": diverged}, indent=1))
    lines = [f"`{command}`", "",
             f"SmolLM2-135M-Instruct, bf16, no speculation, {args.num_prompts} MT-Bench first turns, greedy, "
             f"{args.max_tokens} tokens; {args.started}. How much the margin between "
             "`decode-batch`'s top two tokens moves when the same context is computed another way "
             "(bf16 steps at the top logit's magnitude):", "",
             "| way (against decode-batch) | contexts | median | p99 | max | argmax flips |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['way']} | {r['contexts']} | {r['median_steps']:.1f} | {r['p99_steps']:.1f} | "
              f"{r['max_steps']:.1f} | {r['argmax_flips']} |" for r in rows]
    lines += ["", f"Outputs of `decode-alone` that differ from `decode-batch`: {diverged} of {args.num_prompts} "
              "(no speculation on either side).", "",
              f"The verdict's tolerance (`vllm_respsp.testbed.lossless`): {BF16_STEPS} steps, counted at a top "
              f"logit of at least {STEP_FLOOR_MAGNITUDE:g}; `noise.json` holds each way's worst contexts."]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    from vllm_respsp.testbed.engine_run import make_llm, prepare_cpu_env
    from vllm_respsp.testbed.model import testbed_model_path
    from vllm_respsp.testbed.prompts import load_prompts, render

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-prompts", type=int, default=80)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--tag", default=None, help="results folder name (default bf16-noise-<date started>)")
    args = ap.parse_args(argv)
    args.started = dt.date.today().isoformat()
    prepare_cpu_env()
    llm = make_llm(str(testbed_model_path()), None, dtype="bfloat16", logprobs_mode="raw_logits")
    prompts = prompt_ids(llm, render(load_prompts("mt-bench", args.num_prompts), llm.get_tokenizer()))
    rows, diverged = measure(llm, prompts, args.max_tokens)
    write(RESULTS / (args.tag or f"bf16-noise-{args.started.replace('-', '')}"), rows, diverged, args)


if __name__ == "__main__":
    main()
