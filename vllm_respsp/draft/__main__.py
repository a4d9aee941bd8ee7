"""The whole draft-head pipeline in one command (what `make draft-head` runs):

    python -m vllm_respsp.draft [--work DIR] [--out DIR] [--stop-after STAGE] [--skip-eval]
    python -m vllm_respsp.draft --run NAME --set data_fraction=0.125 [--set KEY=VALUE ...]

replies (vLLM, greedy; committed under data/draft-head/replies) -> features (aux hidden
states, recomputed) -> draft vocab -> training (TTT) -> export (vLLM checkpoint) -> offline
acceptance estimate -> vLLM evaluation -> MODEL_CARD.md. The defaults are the current recipe
(the shipped head's own settings are in its pipeline_summary.json). Every stage resumes:
finished reply and feature shards, the vocab and the training checkpoint (weights, optimizer,
data position, RNG) are reused, so re-running after an interruption (or in the next session)
continues where it stopped. Stage wall times are kept in
<work>/stage_times.json.

`--run NAME` trains a variant (a scaling-curve point or an ablation: `--set` overrides
TrainConfig fields) under <work>/runs/NAME and exports it there instead of over the shipped head.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from vllm_respsp import envs
from vllm_respsp.draft import shipped_head_path
from vllm_respsp.draft.data import (
    DataConfig,
    count_sequences,
    default_work_dir,
    extract_features,
    iter_sequences,
    leading_shards,
    load_feature_shards,
    reply_token_counts,
)
from vllm_respsp.draft.model import draft_vocab_from_counts, export_head
from vllm_respsp.draft.replies import data_table, default_replies_dir, generate_replies, reply_shards
from vllm_respsp.draft.scaling import default_scaling_dir, load_scaling
from vllm_respsp.draft.train import TrainConfig, offline_acceptance, sequences_read, split_sequences, train
from vllm_respsp.testbed.model import testbed_model_path

STAGES = ("replies", "features", "train", "eval")


class StageClock:
    """Records each stage's wall time in <work>/stage_times.json, keeping older entries."""

    def __init__(self, work: Path):
        self.path = work / "stage_times.json"
        self.times = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, name: str, fn, *args, skip_if_done: bool = False):
        start = time.perf_counter()
        result = fn(*args)
        seconds = time.perf_counter() - start
        if not (skip_if_done and seconds < 30 and name in self.times):  # a quick skip keeps the real time
            self.times[name] = round(seconds, 1)
        self.path.write_text(json.dumps(self.times, indent=1))
        print(f"[draft] {name}: {seconds:.0f} s", flush=True)
        return result


def build_vocab(work: Path, data_cfg: DataConfig, cfg: TrainConfig, replies: Path,
                vocab_size: int) -> tuple[torch.Tensor, float]:
    """The draft vocabulary (most frequent reply tokens) and the share of reply tokens it covers,
    kept per vocabulary size and amount of data (more replies, a new vocabulary)."""
    shards = len(reply_shards(replies, data_cfg.sources, data_cfg.replies))
    path = work / f"draft_vocab_{cfg.draft_vocab_size}_{shards}shards.pt"
    counts = reply_token_counts(replies, data_cfg, vocab_size)
    if path.exists():
        vocab = torch.load(path)
    else:
        vocab = draft_vocab_from_counts(counts, cfg.draft_vocab_size)
        torch.save(vocab, path)
    return vocab, float(counts[vocab].sum() / counts.sum())


def train_overrides(pairs: list[str]) -> dict:
    """`--set key=value` pairs as typed TrainConfig fields (a bad key names the allowed ones)."""
    types = {f.name: f.type for f in fields(TrainConfig)}
    out = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        if key not in types:
            raise SystemExit(f"--set {pair}: unknown TrainConfig field {key!r}; allowed: {sorted(types)}")
        kind = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true", "yes")}[types[key]]
        out[key] = kind(raw)
    return out


def heldout_curve(train_log: Path) -> list[dict]:
    """Every held-out evaluation of the training log (each `eval_every` steps, and the last)."""
    rows = [r for r in map(json.loads, train_log.read_text().splitlines()) if "heldout_acc" in r]
    return [{"step": r["step"], "tokens": r.get("tokens"), "heldout_acc": r["heldout_acc"]} for r in rows]


def reexec_with_intel_openmp() -> None:
    """Re-start this process with Intel OpenMP preloaded (prepare_cpu_env sets LD_PRELOAD, which
    only affects processes started afterwards): the HF feature forward measured ~2.5x faster
    with it on this 2-core machine (289 vs 90-120 tok/s), and training uses the same kernels."""
    import os
    import sys

    from vllm_respsp.testbed.engine_run import prepare_cpu_env

    if envs.draft_reexecuted():
        return
    prepare_cpu_env(kv_cache_gib=4)
    os.environ[envs.DRAFT_REEXEC] = "1"
    os.execv(sys.executable, [sys.executable, "-m", "vllm_respsp.draft", *sys.argv[1:]])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=default_work_dir(), help="features, checkpoints, runs")
    parser.add_argument("--replies", type=Path, default=default_replies_dir(), help="the committed replies")
    parser.add_argument("--out", type=Path, default=None, help="export folder (default: the shipped head)")
    parser.add_argument("--stop-after", choices=STAGES, default="eval")
    parser.add_argument("--skip-replies", action="store_true",
                        help="use the reply shards already there (generate none; e.g. while another run does)")
    parser.add_argument("--skip-eval", action="store_true", help="stop after export + offline estimate")
    parser.add_argument("--run", default=None, help="train a variant under <work>/runs/RUN")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TrainConfig field (with --run)")
    args = parser.parse_args()
    if args.set and not args.run:
        parser.error("--set changes the recipe: give the variant a name with --run")
    return args


def main() -> None:
    reexec_with_intel_openmp()
    args = parse_args()
    data_cfg = DataConfig()
    train_cfg = replace(TrainConfig(), **train_overrides(args.set))
    work, model_path, replies = args.work, testbed_model_path(), args.replies
    run_dir = work / "runs" / args.run if args.run else work
    out = args.out or (run_dir / "head" if args.run else shipped_head_path())
    run_dir.mkdir(parents=True, exist_ok=True)
    clock = StageClock(run_dir)
    target_cfg = json.loads((model_path / "config.json").read_text())

    if not args.skip_replies:
        clock.run("replies", generate_replies, replies, data_cfg.sources, data_cfg.replies, model_path,
                  skip_if_done=True)
    if args.stop_after == "replies":
        return
    total = count_sequences(replies, data_cfg)
    shards = leading_shards(replies, data_cfg, sequences_read(total, train_cfg))
    features = clock.run("features", extract_features, work, data_cfg, model_path, shards, skip_if_done=True)
    if args.stop_after == "features":
        return
    vocab, coverage = build_vocab(work, data_cfg, train_cfg, replies, target_cfg["vocab_size"])
    print(f"[draft] draft vocab {len(vocab)} covers {coverage:.1%} of reply tokens", flush=True)

    sequences = list(iter_sequences(load_feature_shards(features, shards)))
    head = clock.run("train", train, sequences, model_path, run_dir / "train", train_cfg, vocab,
                     data_cfg.aux_layers, total, skip_if_done=True)
    export_head(head, target_cfg, out)
    train_seqs, heldout = split_sequences(sequences, train_cfg, total)
    offline = clock.run("offline_estimate", offline_acceptance, head.float().eval(), heldout)
    print(f"[draft] offline estimate on {len(heldout)} held-out sequences: {offline}", flush=True)

    summary = {
        "data": {**asdict(data_cfg), "sequences": len(sequences),
                 "tokens": sum(len(s.ids) for s in sequences),
                 "train_tokens": sum(len(s.ids) for s in train_seqs),
                 "sources": data_table(replies, data_cfg.sources, data_cfg.replies),
                 "draft_vocab_coverage": coverage},
        "train": asdict(train_cfg),
        "train_log_tail": (run_dir / "train" / "train_log.jsonl").read_text().splitlines()[-1],
        "heldout_curve": heldout_curve(run_dir / "train" / "train_log.jsonl"),
        "offline_estimate": offline,
    }
    if args.stop_after == "eval" and not args.skip_eval:
        from vllm_respsp.draft.evaluate import evaluate

        summary["vllm_eval"] = clock.run("evaluate", evaluate, out)
    summary["stage_seconds"] = clock.times
    summary["scaling"] = load_scaling(default_scaling_dir())
    (out / "pipeline_summary.json").write_text(json.dumps(summary, indent=2))
    if not args.run:
        from vllm_respsp.draft.card import write_model_card

        write_model_card(out, summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
