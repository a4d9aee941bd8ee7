"""Acceptance and speed of respsp tree shapes against no speculation, on the testbed.

    python -m benchmarks.tree_shapes --prompts mt-bench --num-prompts 80 --max-tokens 256 \
        --shapes chain5 T16/D5/K4 T32/D6/K8 T64/D6/K8

Every configuration runs the same prompts, greedy, in its own engine process (one at a time),
after a no-speculation reference; the table gives each shape's acceptance length (vLLM's
metric, 1 + accepted / drafts), per-depth acceptance, output tokens/s, the speed ratio to no
speculation, how many outputs are identical to the reference and the lossless verdict
(`vllm_respsp.testbed.lossless`: in bf16 each divergence is checked against the reference
engine's own logits; "MISMATCH" fails the run after the tables are written). `--shapes
cycle:A,B,C` runs one engine in which the requests get different shapes (policy "cycle"). Writes
JSON and Markdown to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def parse_shape(text: str) -> dict:
    from vllm_respsp.tree.shape import ShapeError, TreeShape

    try:
        return TreeShape.parse(text).to_dict()
    except ShapeError as e:
        raise SystemExit(f"--shapes: {e}") from None


def shape_names(config: str) -> list[str]:
    """The shapes a configuration runs: `cycle:A,B,C` -> [A, B, C], a static shape -> [it]."""
    return config[len("cycle:"):].split(",") if config.startswith("cycle:") else [config]


def spec_for(name: str, head: str) -> dict:
    if name.startswith("cycle:"):
        return {"method": "respsp", "model": head, "policy": "cycle",
                "actions": [parse_shape(s) for s in shape_names(name)]}
    return {"method": "respsp", "model": head, "shape": parse_shape(name)}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", action="append", default=None, help="prompt set(s); default mt-bench")
    ap.add_argument("--num-prompts", type=int, default=80, help="per prompt set")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--shapes", nargs="+", default=["chain5", "T16/D5/K4", "T32/D6/K8", "T64/D6/K8"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="1 = batch size 1")
    ap.add_argument("--head", default=None, help="EAGLE-3 head (default: the shipped one)")
    ap.add_argument("--tag", default="tree_shapes")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    from vllm_respsp.draft import shipped_head_path
    from vllm_respsp.testbed.engines import EngineConfig, EngineWorker
    from vllm_respsp.testbed.lossless import TOP_LOGITS, judge
    from vllm_respsp.testbed.model import testbed_model_path
    from vllm_respsp.testbed.prompts import load_prompts

    model = str(testbed_model_path())
    head = args.head or str(shipped_head_path())
    engine = {"dtype": args.dtype, "max_model_len": 2048}
    if args.max_num_seqs:
        engine["max_num_seqs"] = args.max_num_seqs
    prompts = [p for name in (args.prompts or ["mt-bench"]) for p in load_prompts(name, args.num_prompts)]
    sampling = {"temperature": 0.0, "max_tokens": args.max_tokens}
    # the reference engine stays up (idle) beside each shape's: the bf16 verdict asks it for the
    # target's logits where an output diverges
    plain = EngineWorker(model, EngineConfig("none", None, engine))
    try:
        plain.wait_ready()
        texts = plain.render(prompts)
        reference = plain.generate(texts, sampling)
        rows = [shape_row("none", reference, reference, None)]
        for name in args.shapes:
            worker = EngineWorker(model, EngineConfig(name, spec_for(name, head), engine))
            try:
                worker.wait_ready()
                result = worker.generate(texts, sampling)
            finally:
                worker.close()
            verdict = judge(reference["token_ids"], result["token_ids"], reference["prompt_token_ids"],
                            args.dtype, lambda contexts: plain.top_logits(contexts, TOP_LOGITS))
            rows.append(shape_row(name, result, reference, verdict))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        plain.close()
    RESULTS.mkdir(exist_ok=True)
    command = " ".join(["python -m benchmarks.tree_shapes", *map(shlex.quote, sys.argv[1:])])
    meta = {"date": dt.date.today().isoformat(), "command": command, "args": vars(args),
            "model": "SmolLM2-135M-Instruct", "head": head}
    (RESULTS / f"{args.tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(meta, rows)
    (RESULTS / f"{args.tag}.md").write_text(table)
    print(table)
    failed = [r["config"] for r in rows if r["lossless"] and not r["lossless"]["ok"]]
    if failed:
        raise SystemExit(f"MISMATCH: {failed} produced outputs that are not the target's own (not near-ties)")


def depth_of(config: str) -> int:
    """How many draft positions a configuration's row has (vLLM reports a slot per drafted token)."""
    from vllm_respsp.tree.shape import TreeShape

    if config == "none":
        return 0
    return max(TreeShape.parse(n).depth for n in shape_names(config))


def markdown(meta: dict, rows: list[dict]) -> str:
    """The results table; `markdown(**json.load(open(tag + ".json")))` rewrites it from the JSON."""
    args = meta["args"]
    lines = [f"`{meta['command']}`", "",
             f"Greedy, {args['max_tokens']} new tokens, {rows[0]['prompts']} prompts "
             f"({', '.join(args['prompts'] or ['mt-bench'])}), {args['dtype']}, "
             f"max_num_seqs={args['max_num_seqs'] or 'default'}; EAGLE-3 head `{meta['head']}`; {meta['date']}.",
             "", "| config | acceptance length | per-depth acceptance | tok/s | vs no spec | identical | lossless |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        al = f"{r['acceptance_length']:.3f}" if r["acceptance_length"] else "-"
        depth = ", ".join(f"{a:.2f}" for a in r["per_depth"][:depth_of(r["config"])]) or "-"
        lines.append(f"| {r['config']} | {al} | {depth} | {r['tok_s']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['identical']}/{r['prompts']} | {r['lossless']['label'] if r['lossless'] else '-'} |")
    return "\n".join(lines) + "\n"


def shape_row(name: str, result: dict, reference: dict, verdict) -> dict:
    """One configuration's row: acceptance, speed against the reference, identity and verdict."""
    spec, tok_s = result["spec"], result["output_tokens"] / result["seconds"]
    return {"config": name, "tok_s": tok_s,
            "acceptance_length": spec["acceptance_length"] if spec["drafts"] else None,
            "per_depth": [a / spec["drafts"] for a in spec["accepted_per_pos"][:8]] if spec["drafts"] else [],
            "identical": sum(a == b for a, b in zip(result["token_ids"], reference["token_ids"])),
            "lossless": verdict.to_dict() if verdict else None,
            "prompts": len(result["token_ids"]), "seconds": result["seconds"],
            "output_tokens": result["output_tokens"],
            "speedup": tok_s / (reference["output_tokens"] / reference["seconds"])}


if __name__ == "__main__":
    main()
