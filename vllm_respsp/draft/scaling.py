"""The draft head's scaling curve and recipe ablations: each point is one resumable pipeline run.

    python -m vllm_respsp.draft.scaling curve  [--fractions 0.125 0.25 0.5 1] [--mtbench N]
    python -m vllm_respsp.draft.scaling ablate [--fraction 0.125] [--only NAME ...] [--mtbench N]

A point is `python -m vllm_respsp.draft --skip-replies --skip-eval --run NAME --set ...` over
the reply shards already there (committed or generated), in a process of its own; a finished
point is reused, an interrupted one resumes from its checkpoint; the default recipe's point shares
the main run's training (`share_main_training`) and the ablations' baseline is the curve's point
of the same data share. Each point is then measured
the same way: held-out per-step accuracy (teacher-forced, on the same held-out slice for every
point: `train.split_sequences`), the offline chain-5 estimate, and vLLM's chain-5 acceptance
length on the first `--mtbench` MT-Bench prompts (greedy, 256 tokens). Writes
<work>/scaling/{curve,ablations}.json, and the curve as a PNG (held-out step 0-4 accuracy and vLLM
acceptance length against training tokens) into the shipped head's folder for its model card.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from vllm_respsp.draft import shipped_head_path
from vllm_respsp.draft.data import default_work_dir
from vllm_respsp.draft.train import TrainConfig

# name -> TrainConfig overrides: the levers of the EAGLE-3 recipe, each against the baseline
ABLATIONS: dict[str, dict[str, object]] = {
    "baseline": {},
    "midlayer_from_target": {"init_midlayer_from_target": True},
    "ttt_7_steps": {"ttt_steps": 7},
    "deep_steps_full_weight": {"deep_step_weight": 1.0},
    "deep_rows_all": {"deep_row_fraction": 1.0},
    "epochs_2": {"epochs": 2},
    "draft_vocab_4k": {"draft_vocab_size": 4096},
    "draft_vocab_16k": {"draft_vocab_size": 16384},
}


def share_main_training(name: str, overrides: dict, work: Path) -> None:
    """A point whose recipe is the default one (the curve's "all the data") is the main run of
    `make draft-head`: its training folder is linked, not trained again (an hour here). The
    checkpoint is keyed by the whole config, so whichever of the two runs first, the other resumes
    it or finds it finished."""
    if replace(TrainConfig(), **overrides) != TrainConfig():
        return
    main, point = work / "train", work / "runs" / name / "train"
    if not point.exists():
        main.mkdir(parents=True, exist_ok=True)
        point.parent.mkdir(parents=True, exist_ok=True)
        point.symlink_to(main.resolve(), target_is_directory=True)


def run_point(name: str, overrides: dict, work: Path) -> dict:
    """Train (or resume, or reuse) one variant; its pipeline summary."""
    summary = work / "runs" / name / "head" / "pipeline_summary.json"
    if not summary.exists():
        share_main_training(name, overrides, work)
        command = [sys.executable, "-m", "vllm_respsp.draft", "--skip-replies", "--skip-eval", "--work", str(work),
                   "--run", name, *[arg for k, v in overrides.items() for arg in ("--set", f"{k}={v}")]]
        subprocess.run(command, check=True)
    return json.loads(summary.read_text())


def vllm_acceptance(head: Path, mtbench: int) -> dict:
    from vllm_respsp.draft.evaluate import (
        MAX_NEW_TOKENS,
        NUM_SPECULATIVE_TOKENS,
        prompt_token_ids,
        run_engine_job,
        spec_summary,
    )
    from vllm_respsp.testbed.model import testbed_model_path

    model = testbed_model_path()
    spec = {"method": "eagle3", "model": str(head), "num_speculative_tokens": NUM_SPECULATIVE_TOKENS}
    result = run_engine_job({"model": str(model), "prompts": prompt_token_ids("mt-bench", model, mtbench),
                             "samplings": [{"temperature": 0.0, "max_tokens": MAX_NEW_TOKENS}],
                             "engine": {"max_model_len": 2048}, "speculative_config": spec})["results"][0]
    return spec_summary(result)


def measure(name: str, overrides: dict, work: Path, mtbench: int) -> dict:
    summary = run_point(name, overrides, work)
    point = {"name": name, "overrides": overrides, "train_tokens": summary["data"]["train_tokens"],
             "heldout_acc": summary["heldout_curve"][-1]["heldout_acc"],
             "offline_acceptance_length": summary["offline_estimate"]["acceptance_length"]}
    cached = work / "runs" / name / "vllm_mtbench.json"
    if mtbench:
        if not cached.exists() or json.loads(cached.read_text()).get("prompts") != mtbench:
            result = vllm_acceptance(work / "runs" / name / "head", mtbench)
            cached.write_text(json.dumps({"prompts": mtbench, **result}))
        point["vllm_mtbench"] = json.loads(cached.read_text())
    return point


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_step_accuracy(ax, tokens: list[float], heldout_accs: list[list[float]], title: str) -> None:
    """Held-out accuracy of each draft step against training tokens (millions)."""
    for k in range(len(heldout_accs[0])):
        ax.plot(tokens, [acc[k] for acc in heldout_accs], marker="o", label=f"step {k}")
    ax.set(xlabel="training tokens (M)", ylabel="held-out top-1 accuracy", title=title)
    ax.legend()


def plot_curve(points: list[dict], path: Path) -> None:
    plt = _pyplot()
    tokens = [p["train_tokens"] / 1e6 for p in points]
    fig, (acc, length) = plt.subplots(1, 2, figsize=(10, 4))
    plot_step_accuracy(acc, tokens, [p["heldout_acc"] for p in points], "per draft step (teacher-forced)")
    acc.set(xscale="log")
    length.plot(tokens, [p["offline_acceptance_length"] for p in points], marker="o", label="offline estimate")
    if all("vllm_mtbench" in p for p in points):
        length.plot(tokens, [p["vllm_mtbench"]["acceptance_length"] for p in points], marker="s",
                    label="vLLM, MT-Bench")
    length.set(xscale="log", xlabel="training tokens (M)", ylabel="chain-5 acceptance length",
               title="acceptance length")
    length.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_heldout_curve(curve: list[dict], path: Path) -> None:
    """One run's held-out evaluations against the training tokens it had seen by then."""
    rows = [r for r in curve if r.get("tokens")]
    if not rows:
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    plot_step_accuracy(ax, [r["tokens"] / 1e6 for r in rows], [r["heldout_acc"] for r in rows],
                       "one pass over the data (teacher-forced)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["curve", "ablate"])
    parser.add_argument("--work", type=Path, default=default_work_dir())
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.125, 0.25, 0.5, 1.0])
    parser.add_argument("--fraction", type=float, default=0.125, help="the data share every ablation trains on")
    parser.add_argument("--only", nargs="*", default=None, help=f"ablations to run (of {sorted(ABLATIONS)})")
    parser.add_argument("--mtbench", type=int, default=80, help="MT-Bench prompts for vLLM (0: offline only)")
    args = parser.parse_args()
    out = args.work / "scaling"
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "curve":
        points = [measure(f"fraction-{f:g}", {"data_fraction": f}, args.work, args.mtbench) for f in args.fractions]
        (out / "curve.json").write_text(json.dumps(points, indent=1))
        plot_curve(points, shipped_head_path() / "scaling_curve.png")
    else:
        names = args.only or list(ABLATIONS)
        unknown = sorted(set(names) - set(ABLATIONS))
        if unknown:
            parser.error(f"--only: unknown ablation(s) {unknown}; allowed: {sorted(ABLATIONS)}")
        # the baseline is the curve's point of that data share: trained once for both
        points = [measure(f"fraction-{args.fraction:g}" if n == "baseline" else f"ablate-{n}-{args.fraction:g}",
                          {"data_fraction": args.fraction, **ABLATIONS[n]}, args.work, args.mtbench)
                  for n in names]
        (out / "ablations.json").write_text(json.dumps(points, indent=1))
    print(json.dumps(points, indent=1))


if __name__ == "__main__":
    main()
