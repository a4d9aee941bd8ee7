"""Record trace tables with the real engine (design.md §6), and check them against it.

    python -m vllm_respsp.engine_tools.record --prompts mt-bench --num-prompts 80 --max-tokens 128 \\
        --out vllm_respsp/policy/traces/mt-bench [--check chain3 T4/D2/K2 T8/D3/K4]

1. One greedy run of the respsp engine with `VLLM_RESPSP_RECORD` set (runtime.recorder): it
   decodes as without speculation and records, per step and request, the policy features and
   the tree each action would have drafted.
2. Each recorded tree is walked along the tokens the target then produced: a node at depth d
   is accepted when its whole path equals the next d output tokens. That gives A[p, a].
3. The prompts as the engine saw them and the outputs go to <out>.outputs.json, for
   `engine_tools.check` (`--check SHAPE ...` runs it right away): the same prompts through the
   respsp engine with static shapes or a policy; vLLM's own acceptance length against the
   simulator's, and the outputs against the recording's (identical: float32, greedy).

The default dtype is float32: in bf16 a verification batch can flip argmax near-ties, and then
the text (so the table) depends on the shapes chosen.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vllm_respsp import envs
from vllm_respsp.engine_tools.check import outputs_path, run_checks, simulated_acceptance
from vllm_respsp.policy.pools import DraftPool, pool_depths
from vllm_respsp.policy.traces import FeatureSpec, Generation, TraceError, TraceSet, load_traces, save_traces
from vllm_respsp.testbed.model import file_sha256
from vllm_respsp.tree.shape import EAGLE3_DEFAULT, TreeShape

# The table stored with a recording (any other shape its pools cover can be derived later,
# `TraceSet.with_actions`): static chains and small trees, EAGLE-3's default tree, and
# confidence-bounded chains and trees. The recorder grows one pool per width, as deep as the
# deepest of these shapes of that width: (D8, K1), (D6, K2), (D5, K4), (D8, K10).
BOUNDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
DEFAULT_ACTIONS = (("chain1", "chain2", "chain3", "chain4", "chain5", "chain6", "chain8",
                    "T3/D2/K2", "T4/D2/K2", "T6/D3/K2", "T8/D4/K2", "T12/D6/K2",
                    "T8/D3/K4", "T12/D4/K4", "T16/D5/K4", str(EAGLE3_DEFAULT))
                   + tuple(f"T8/D8/K1/p{p}" for p in BOUNDS)
                   + tuple(f"T12/D6/K2/p{p}" for p in BOUNDS)
                   + tuple(f"T16/D5/K4/p{p}" for p in BOUNDS))


def matched_nodes(trees, roots_at: np.ndarray, output: np.ndarray) -> np.ndarray:
    """bool [nodes]: each recorded node's whole path equals the output after its tree's root.

    trees     (tokens, parents, depths, cu_nodes) of T trees, flattened, breadth-first each
    roots_at  [T] output index of each tree's root token
    """
    tokens, parents, depths, cu = (np.asarray(t) for t in trees)
    tree_of = np.repeat(np.arange(len(cu) - 1), np.diff(cu))
    target_at = roots_at[tree_of] + depths  # output index a node's token must equal
    padded = np.concatenate([output, [-1]])
    ok = (depths == 0) | (padded[np.minimum(target_at, len(output))] == tokens)
    global_parent = np.where(parents >= 0, parents + cu[tree_of], -1)
    matched = ok.copy()
    for d in range(1, int(depths.max(initial=0)) + 1):  # nodes are breadth-first per tree
        level = depths == d
        matched[level] &= matched[global_parent[level]]
    return matched


def accepted_lengths(trees, roots_at: np.ndarray, output: np.ndarray) -> np.ndarray:
    """Accepted draft tokens of each recorded tree along `output` (its deepest matched node)."""
    depths, cu = np.asarray(trees[2]), np.asarray(trees[3])
    tree_of = np.repeat(np.arange(len(cu) - 1), np.diff(cu))
    matched = matched_nodes(trees, roots_at, output)
    best = np.zeros(len(cu) - 1, dtype=np.int64)
    np.maximum.at(best, tree_of[matched], depths[matched])
    return best


def assemble(records, outputs: dict[tuple, list[int]], prompt_ids: dict[tuple, tuple[str, str]]):
    """(generations with their pools, pool shapes, feature names) from the recorder's records
    and the final outputs; the generations hold no table yet (`TraceSet.with_actions`)."""
    steps: dict[str, dict[int, tuple]] = defaultdict(dict)
    prompts: dict[str, tuple] = {}
    pools = names = None
    for rec in records:
        pools, names = [TreeShape.parse(p) for p in rec["pools"]], rec["feature_names"]
        prompts.update({r: tuple(p) for r, p in rec["prompts"].items()})
        tokens, parents, depths, scores, cu = rec["trees"]
        n = len(pools)
        for i, req in enumerate(rec["req_ids"]):
            lo, hi = cu[i * n], cu[(i + 1) * n]
            tree = (tokens[lo:hi], parents[lo:hi], depths[lo:hi], scores[lo:hi], cu[i * n:(i + 1) * n + 1] - lo)
            steps[req][rec["root_positions"][i]] = (rec["root_tokens"][i], rec["features"][i], tree)
    layout = np.concatenate([np.concatenate([[0], pool_depths(p)]) for p in pools]) if pools else None
    generations = {}
    for req, by_pos in steps.items():
        prompt = prompts[req]
        output = np.array(outputs[prompt])
        positions = sorted(by_pos)
        roots = [by_pos[p][0] for p in positions]
        if positions != list(range(len(prompt), len(prompt) + len(output))) or roots != list(output):
            raise RuntimeError(f"request {req}: the recorded roots are not the engine's output "
                               f"({len(roots)} roots for {len(output)} output tokens)")
        P = len(output) - 1  # the last token has no continuation to accept
        if P < 1:
            continue  # a one-token answer: no step to draft for
        features = np.stack([by_pos[p][1] for p in positions[:P]]).astype(np.float32)
        scores = np.empty((P, len(layout)), np.float32)
        matched = np.empty((P, len(layout)), bool)
        parent_of = np.empty((P, len(layout)), np.int16)
        for j, pos in enumerate(positions[:P]):
            tokens, parents, depths, node_scores, cu = by_pos[pos][2]
            if not np.array_equal(depths, layout):
                raise RuntimeError(f"request {req}, position {pos}: a recorded pool is not a full "
                                   f"beam (depths {depths.tolist()})")
            scores[j] = node_scores
            matched[j] = matched_nodes((tokens, parents, depths, cu), np.full(len(pools), j), output)
            parent_of[j] = parents - 1  # pool index: the root is dropped, its children get -1
        cu = np.cumsum([0] + [p.capacity + 1 for p in pools])
        gen_pools = [DraftPool(p, *(a[:, cu[k] + 1:cu[k + 1]] for a in (scores, matched, parent_of)))
                     for k, p in enumerate(pools)]  # roots dropped: a pool is its draft nodes
        generations[prompt] = Generation(*prompt_ids[prompt], features, np.zeros((P, 0), np.int16),
                                         pools=gen_pools)
    return generations, pools, names


def weights_digest(folder: Path) -> str:
    files = "".join(file_sha256(p) for p in sorted(folder.glob("*.safetensors")))
    return hashlib.sha256(files.encode()).hexdigest()[:16]


def recording_recipe(args, head: str, model: str) -> dict:
    """What a recording depends on: its arguments and the weights it ran (a `make policy` rerun
    after an interruption skips the sets already recorded, and records again after a new head)."""
    weights = {name: weights_digest(Path(path)) for name, path in (("head", head), ("model", model))}
    arguments = {k: v for k, v in sorted(vars(args).items()) if k not in ("out", "force")}
    return {"arguments": arguments, "weights_sha256": weights}


def already_recorded(out: str, recipe: dict) -> bool:
    report = Path(f"{out}.report.json")
    if not report.is_file():
        return False
    try:
        load_traces(out)
        return json.loads(report.read_text()).get("recipe") == recipe
    except (ValueError, TraceError):
        return False


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="mt-bench", help="prompt set name or .jsonl path")
    parser.add_argument("--num-prompts", type=int, default=80)
    parser.add_argument("--skip", type=int, default=0, help="skip this many prompts of the set first")
    parser.add_argument("--unseen-by-head", action="store_true",
                        help="leave out every prompt of the draft head's reply plans (data/draft-head/"
                             "replies/*/plan.json.gz) first: a head drafts its own training replies "
                             "too well, and a policy trained on them expects too much of it")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-prompt-tokens", type=int, default=1024,
                        help="leave out longer prompts (ShareGPT has some beyond the context)")
    parser.add_argument("--actions", nargs="+", default=list(DEFAULT_ACTIONS),
                        help="the table stored with the traces; one pool per width is recorded, as "
                             "deep as the deepest of these shapes of that width")
    parser.add_argument("--head", default=None, help="EAGLE-3 head (default: the shipped head)")
    parser.add_argument("--model", default=None, help="target model (default: the testbed model)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--out", required=True, help="trace stem: writes <out>.json + .safetensors")
    parser.add_argument("--check", nargs="*", default=[], metavar="SHAPE",
                        help="compare vLLM's acceptance length with the simulator's for these shapes")
    parser.add_argument("--force", action="store_true",
                        help="record again although <out>.report.json says this recipe was recorded")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from vllm_respsp.draft import shipped_head_path
    from vllm_respsp.policy.features import feature_dims
    from vllm_respsp.testbed.engine_run import prepare_cpu_env
    from vllm_respsp.testbed.model import testbed_model_path

    head = args.head or str(shipped_head_path())
    model = args.model or str(testbed_model_path())
    recipe = recording_recipe(args, head, model)
    if not args.force and already_recorded(args.out, recipe):
        print(f"{args.out}: already recorded with this head and these arguments "
              f"({args.out}.report.json); --force records again")
        return
    prepare_cpu_env()
    actions = [TreeShape.parse(a) for a in args.actions]
    engine = {"dtype": args.dtype, "max_num_seqs": args.max_num_seqs}
    spec = {"method": "respsp", "model": head, "shape": actions[0].to_dict(),
            "actions": [a.to_dict() for a in actions]}
    run = generate_recorded(model, spec, engine, chosen_prompts(args), args)
    head_hidden = json.loads((Path(head) / "config.json").read_text())["hidden_size"]
    dims = feature_dims(head_hidden)
    traces = TraceSet([], [FeatureSpec(n, dims[n]) for n in run.feature_names], run.generations,
                      target={"name": Path(model).name, "hidden_size": run.target_hidden},
                      head={"name": Path(head).name, "hidden_size": head_hidden},
                      temperature=0.0).with_actions(actions)
    save_traces(traces, args.out)
    run.records.unlink()
    outputs_path(args.out).write_text(json.dumps({
        "model": model, "head": head, "engine": engine, "max_tokens": args.max_tokens,
        "prompts": [{"id": p.id, "text": t, "output": o} for p, t, o in zip(run.prompts, run.texts, run.outputs)]}))
    report = {"recipe": recipe, "out": args.out, "prompts": args.prompts, "num_prompts": len(run.prompts),
              "skip": args.skip,
              "max_tokens": args.max_tokens, "dtype": args.dtype,
              "positions": sum(g.num_positions for g in traces.generations),
              "static_acceptance_length": {str(a): simulated_acceptance(traces, i)
                                           for i, a in enumerate(traces.actions)}}
    if args.check:
        report["check"] = run_checks(args.out, [TreeShape.parse(s) for s in args.check], [],
                                     model, head, engine, args.max_num_seqs)
    Path(f"{args.out}.report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def chosen_prompts(args) -> list:
    """The set's prompts from `--skip` on, `--num-prompts` of them, after leaving out the draft
    head's own training prompts with `--unseen-by-head`."""
    from vllm_respsp.draft.replies import planned_prompt_ids
    from vllm_respsp.testbed.prompts import load_prompts

    prompts = load_prompts(args.prompts, limit=None if args.unseen_by_head else args.skip + args.num_prompts)
    if args.unseen_by_head:
        seen = planned_prompt_ids()
        print(f"leaving out {sum(p.id in seen for p in prompts)} prompts the draft head trained on")
        prompts = [p for p in prompts if p.id not in seen]
    return prompts[args.skip:args.skip + args.num_prompts]


@dataclass
class RecordedRun:
    """What one recording engine gave: the prompts kept, their chat texts, vLLM's greedy
    outputs, each one's recorded generation (features and drafts per step), the feature
    blocks' names, the target's hidden size and the records file."""

    prompts: list
    texts: list[str]
    outputs: list[list[int]]
    generations: list
    feature_names: list[str]
    target_hidden: int
    records: Path


def generate_recorded(model: str, spec: dict, engine: dict, prompts: list, args) -> RecordedRun:
    """Generate greedily with the recorder on (the engine process writes every step to a
    records file); prompts longer than `--max-prompt-tokens` and one-token answers are left out."""
    from vllm import SamplingParams

    from vllm_respsp.runtime.recorder import read_records
    from vllm_respsp.testbed.engine_run import make_llm
    from vllm_respsp.testbed.prompts import render

    records = Path(tempfile.mkstemp(suffix=".records")[1])
    os.environ[envs.RECORD] = str(records)  # read by the engine process this LLM starts
    llm = make_llm(model, spec, **engine)
    del os.environ[envs.RECORD]
    tokenizer = llm.get_tokenizer()
    texts = render(prompts, tokenizer)
    fits = [len(tokenizer(t, add_special_tokens=False).input_ids) <= args.max_prompt_tokens for t in texts]
    if not all(fits):
        print(f"leaving out {fits.count(False)} prompts longer than {args.max_prompt_tokens} tokens")
        prompts = [p for p, ok in zip(prompts, fits) if ok]
        texts = [t for t, ok in zip(texts, fits) if ok]
    raw = llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens), use_tqdm=True)
    reference = [list(o.outputs[0].token_ids) for o in raw]
    by_prompt = {tuple(o.prompt_token_ids): list(o.outputs[0].token_ids) for o in raw}
    ids = {tuple(o.prompt_token_ids): (p.id, args.prompts) for o, p in zip(raw, prompts)}
    hidden = llm.llm_engine.model_config.get_hidden_size()
    del llm
    generations, _, names = assemble(read_records(str(records)), by_prompt, ids)
    kept = [tuple(o.prompt_token_ids) in generations for o in raw]
    lost = [i for i, ok in enumerate(kept) if not ok and len(reference[i]) > 1]
    if lost:
        raise SystemExit(f"prompts {[prompts[i].id for i in lost]}: no recorded steps although they "
                         f"generated tokens; the records stay in {records}")
    if not all(kept):  # answers of a single token: nothing to draft for, nothing to check
        print(f"leaving out {kept.count(False)} one-token answers")
        prompts, texts, reference, raw = ([x for x, ok in zip(seq, kept) if ok]
                                          for seq in (prompts, texts, reference, raw))
    return RecordedRun(prompts, texts, reference, [generations[tuple(o.prompt_token_ids)] for o in raw],
                       names, hidden, records)


if __name__ == "__main__":
    main()
