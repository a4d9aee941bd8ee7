"""The whole draft-head pipeline in one command (what `make draft-head` runs):

    python -m vllm_respsp.draft [--work DIR] [--out DIR] [--skip-eval]

replies (vLLM, greedy) -> features (aux hidden states) -> draft vocab -> training (TTT) ->
export (vLLM checkpoint) -> offline acceptance estimate -> vLLM evaluation -> MODEL_CARD.md.
The defaults reproduce the shipped head. Every stage resumes: finished shards, the vocab and
the training checkpoint are reused, so re-running after an interruption continues. Stage wall
times are kept in <work>/stage_times.json (a stage skipped because its output exists keeps
the time it took when it ran).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from vllm_respsp.draft import shipped_head_path
from vllm_respsp.draft.data import (DataConfig, default_work_dir, extract_features, generate_replies,
                                    iter_sequences, load_feature_shards, reply_token_counts)
from vllm_respsp.draft.model import draft_vocab_from_counts, export_head
from vllm_respsp.draft.train import TrainConfig, offline_acceptance, train
from vllm_respsp.testbed.model import testbed_model_path


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


def build_vocab(work: Path, cfg: TrainConfig, vocab_size: int) -> tuple[torch.Tensor, float]:
    """The draft vocabulary (most frequent reply tokens) and the share of reply tokens it covers."""
    path = work / f"draft_vocab_{cfg.draft_vocab_size}.pt"
    counts = reply_token_counts(work / "replies", vocab_size)
    if path.exists():
        vocab = torch.load(path)
    else:
        vocab = draft_vocab_from_counts(counts, cfg.draft_vocab_size)
        torch.save(vocab, path)
    return vocab, float(counts[vocab].sum() / counts.sum())


def heldout_curve(train_log: Path, every: int = 400) -> list[dict]:
    """Every `every`-th held-out evaluation of the training log, and the last one."""
    rows = [r for r in map(json.loads, train_log.read_text().splitlines()) if "heldout_acc" in r]
    kept = [r for r in rows if r["step"] % every == 0 or r is rows[-1]]
    return [{"step": r["step"], "heldout_acc": r["heldout_acc"]} for r in kept]


def reexec_with_intel_openmp() -> None:
    """Re-start this process with Intel OpenMP preloaded (prepare_cpu_env sets LD_PRELOAD, which
    only affects processes started afterwards): the HF feature forward measured ~2.5x faster
    with it on this 2-core machine (289 vs 90-120 tok/s), and training uses the same kernels."""
    import os
    import sys

    from vllm_respsp.testbed.engine_run import prepare_cpu_env

    if os.environ.get("VLLM_RESPSP_DRAFT_REEXEC"):
        return
    prepare_cpu_env(kv_cache_gib=4)
    os.environ["VLLM_RESPSP_DRAFT_REEXEC"] = "1"
    os.execv(sys.executable, [sys.executable, "-m", "vllm_respsp.draft", *sys.argv[1:]])


def main() -> None:
    reexec_with_intel_openmp()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=default_work_dir())
    parser.add_argument("--out", type=Path, default=shipped_head_path())
    parser.add_argument("--skip-eval", action="store_true", help="stop after export + offline estimate")
    args = parser.parse_args()

    data_cfg, train_cfg = DataConfig(), TrainConfig()
    work, model_path = args.work, testbed_model_path()
    work.mkdir(parents=True, exist_ok=True)
    clock = StageClock(work)
    target_cfg = json.loads((model_path / "config.json").read_text())

    clock.run("replies", generate_replies, work, data_cfg, model_path, skip_if_done=True)
    features = clock.run("features", extract_features, work, data_cfg, model_path, skip_if_done=True)
    vocab, coverage = build_vocab(work, train_cfg, target_cfg["vocab_size"])
    print(f"[draft] draft vocab {len(vocab)} covers {coverage:.1%} of reply tokens", flush=True)

    head = clock.run("train", train, features, model_path, work / "train", train_cfg, vocab,
                     data_cfg.aux_layers, skip_if_done=True)
    export_head(head, target_cfg, args.out)

    sequences = list(iter_sequences(load_feature_shards(features)))  # the shards are GBs: read once
    heldout = sequences[-train_cfg.heldout_sequences:]
    offline = clock.run("offline_estimate", offline_acceptance, head.float().eval(), heldout)
    print(f"[draft] offline estimate on {len(heldout)} held-out sequences: {offline}", flush=True)

    summary = {
        "data": {**asdict(data_cfg), "sequences": len(sequences),
                 "tokens": sum(len(s.ids) for s in sequences),
                 "draft_vocab_coverage": coverage},
        "train": asdict(train_cfg),
        "train_log_tail": (work / "train" / "train_log.jsonl").read_text().splitlines()[-1],
        "heldout_curve": heldout_curve(work / "train" / "train_log.jsonl"),
        "offline_estimate": offline,
    }
    if not args.skip_eval:
        from vllm_respsp.draft.evaluate import evaluate

        summary["vllm_eval"] = clock.run("evaluate", evaluate, args.out)
    summary["stage_seconds"] = clock.times
    (args.out / "pipeline_summary.json").write_text(json.dumps(summary, indent=2))
    from vllm_respsp.draft.card import write_model_card

    write_model_card(args.out, summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
