"""The draft head's scaling curve and recipe ablations: each point is one resumable pipeline run.

    python -m vllm_respsp.draft.scaling curve  [--fractions 0.125 0.25 0.5 1] [--mtbench N]
    python -m vllm_respsp.draft.scaling ablate [--fraction 0.125] [--only NAME ...] [--mtbench N]
    python -m vllm_respsp.draft.scaling card     (the shipped head's card from the kept points)

A point is `python -m vllm_respsp.draft --skip-replies --skip-eval --run NAME --set ...` over
the reply shards already there (committed or generated), in a process of its own; a finished
point is reused, an interrupted one resumes from its checkpoint; the default recipe's point shares
the main run's training (`share_main_training`) and the ablations' baseline is the curve's point
of the same data share. Each point is then measured
the same way: held-out per-step accuracy (teacher-forced, on the same held-out slice for every
point: `train.split_sequences`), the offline chain-5 estimate, and vLLM's chain-5 acceptance
length on the first `--mtbench` MT-Bench prompts (greedy, 256 tokens).

The measured points are small and cost an hour or more each to remake, while the features and
runs they come from live in the cache, which may be gone next session: so they are committed
under data/draft-head/scaling/{curve,ablations}.json, merged by point name (a run of some
ablations adds to the others), and a point measured there with the same overrides is reused
without features (`--remeasure` measures again). After each command the shipped head's model
card is rewritten with the tables, and the curve as a PNG (held-out step 0-4 accuracy and vLLM
acceptance length against training tokens) goes beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

from vllm_respsp.draft import shipped_head_path
from vllm_respsp.draft.card import scaling_lines, write_model_card
from vllm_respsp.draft.data import default_work_dir
from vllm_respsp.draft.plots import plot_curve
from vllm_respsp.draft.train import TrainConfig, recipe_label

# name -> TrainConfig overrides: the levers of the EAGLE-3 recipe, each against the baseline
# (the recipe's defaults). Two levers became defaults after they paid on 1/8 of the data
# (kept there as `midlayer_from_target` and `epochs_2`); their ablations now take them back out.
ABLATIONS: dict[str, dict[str, object]] = {
    "baseline": {},
    "midlayer_random": {"init_midlayer_from_target": False},
    "epochs_1": {"epochs": 1},
    "ttt_7_steps": {"ttt_steps": 7},
    "deep_steps_full_weight": {"deep_step_weight": 1.0},
    "deep_rows_all": {"deep_row_fraction": 1.0},
    # the training-time test on 70% of the batches instead of 30%: the one-pass head of 2026-12-05
    # was short of deep-step acceptance in vLLM (HumanEval position 2: 0.118 vs 0.144 before)
    "ttt_on_70pct": {"single_step_epochs": 0.3},
    "draft_vocab_4k": {"draft_vocab_size": 4096},
    "draft_vocab_16k": {"draft_vocab_size": 16384},
}


def point_config(overrides: dict) -> dict:
    """The whole training config a point with `overrides` trains with under today's defaults."""
    return asdict(replace(TrainConfig(), **overrides))


def share_main_training(name: str, overrides: dict, work: Path) -> None:
    """A point whose recipe is the default one (the curve's "all the data") is the main run of
    `make draft-head`: its training folder is linked, not trained again (~2.7 h here). The
    checkpoint is keyed by the whole config, so whichever of the two runs first, the other resumes
    it or finds it finished."""
    if point_config(overrides) != asdict(TrainConfig()):
        return
    main, point = work / "train", work / "runs" / name / "train"
    if not point.exists():
        main.mkdir(parents=True, exist_ok=True)
        point.parent.mkdir(parents=True, exist_ok=True)
        point.symlink_to(main.resolve(), target_is_directory=True)


def run_point(name: str, overrides: dict, work: Path) -> dict:
    """Train (or resume, or reuse) one variant; its pipeline summary."""
    summary = work / "runs" / name / "head" / "pipeline_summary.json"
    if not summary.exists() or json.loads(summary.read_text())["train"] != point_config(overrides):
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


def default_scaling_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "data" / "draft-head" / "scaling"


def load_scaling(folder: Path) -> dict[str, list[dict]]:
    """{"curve": [point, ...], "ablations": [...]}: what was measured so far (a kind not run yet
    is left out)."""
    return {kind: json.loads((folder / f"{kind}.json").read_text())
            for kind in ("curve", "ablations") if (folder / f"{kind}.json").exists()}


def merge_point(points: list[dict], point: dict) -> list[dict]:
    """`points` with `point` in place of the one of its name, or appended."""
    names = [p["name"] for p in points]
    if point["name"] not in names:
        return [*points, point]
    return [point if n == point["name"] else p for p, n in zip(points, names)]


def reusable(point: dict | None, overrides: dict, mtbench: int) -> bool:
    """A kept point stands for `overrides` if it was trained with the whole config they give
    today (a changed default makes it stale) and measured on as many MT-Bench prompts."""
    return (point is not None and point.get("train") == point_config(overrides)
            and (not mtbench or point.get("vllm_mtbench", {}).get("prompts") == mtbench))


SCALING_BEGIN = "<!-- scaling: written by python -m vllm_respsp.draft.scaling -->"
SCALING_END = "<!-- /scaling -->"


def with_scaling_section(card: str, scaling: dict[str, list[dict]]) -> str:
    """`card` with its scaling section (between the markers) replaced, or appended."""
    section = "\n".join([SCALING_BEGIN, "", *scaling_lines(scaling), SCALING_END]) + "\n"
    if SCALING_BEGIN in card and SCALING_END in card:
        before, rest = card.split(SCALING_BEGIN, 1)
        return before + section + rest.split(SCALING_END, 1)[1].lstrip("\n")
    return card.rstrip("\n") + "\n\n" + section


def refresh_shipped_card(scaling: dict[str, list[dict]]) -> None:
    """The shipped head's model card with the scaling tables, and the curve's PNG.

    A head made before the per-source data pipeline cannot have its card rendered anew (its
    summary lacks what the data table needs): its card keeps what it says and gets the scaling
    section in place, between markers, so the curve and ablations sit beside the head they are
    about to replace or not."""
    head = shipped_head_path()
    summary = json.loads((head / "pipeline_summary.json").read_text())
    if "sources" in summary["data"]:  # the card is rendered from the summary: it carries the points
        summary["scaling"] = scaling
        (head / "pipeline_summary.json").write_text(json.dumps(summary, indent=2))
        write_model_card(head, summary)
    else:
        card = head / "MODEL_CARD.md"
        card.write_text(with_scaling_section(card.read_text(), scaling))
    if scaling.get("curve"):
        plot_curve(scaling["curve"], head / "scaling_curve.png")


def main_run_summary(overrides: dict) -> dict | None:
    """The shipped head's pipeline summary when that head is this point's training (the main run
    of `make draft-head`, evaluated there on MT-Bench already), else None."""
    summary = json.loads((shipped_head_path() / "pipeline_summary.json").read_text())
    return summary if summary.get("train") == point_config(overrides) and "vllm_eval" in summary else None


def measure(name: str, overrides: dict, work: Path, mtbench: int) -> dict:
    main = main_run_summary(overrides)
    summary = main or run_point(name, overrides, work)
    point = {"name": name, "overrides": overrides, "train": summary["train"],
             "train_tokens": summary["data"]["train_tokens"],
             "heldout_acc": summary["heldout_curve"][-1]["heldout_acc"],
             "offline_acceptance_length": summary["offline_estimate"]["acceptance_length"]}
    head = shipped_head_path() if main else work / "runs" / name / "head"
    cached = work / "runs" / name / "vllm_mtbench.json"
    if main and main["vllm_eval"]["mt_bench"]["prompts"] == mtbench:
        point["vllm_mtbench"] = main["vllm_eval"]["mt_bench"]
    elif mtbench:
        # measured once per head and prompt count (a retrained point has a new head)
        key = {"prompts": mtbench, "train": summary["train"]}
        kept = json.loads(cached.read_text()) if cached.exists() else {}
        if {k: kept.get(k) for k in key} != key:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps({**key, **vllm_acceptance(head, mtbench)}))
        point["vllm_mtbench"] = {k: v for k, v in json.loads(cached.read_text()).items() if k != "train"}
    return point


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["curve", "ablate", "card"],
                        help="card: only rewrite the shipped head's card from the kept points")
    parser.add_argument("--work", type=Path, default=default_work_dir())
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.125, 0.25, 0.5, 1.0])
    parser.add_argument("--fraction", type=float, default=0.125, help="the data share every ablation trains on")
    parser.add_argument("--only", nargs="*", default=None, help=f"ablations to run (of {sorted(ABLATIONS)})")
    parser.add_argument("--mtbench", type=int, default=80, help="MT-Bench prompts for vLLM (0: offline only)")
    parser.add_argument("--out", type=Path, default=default_scaling_dir(), help="where the points are kept")
    parser.add_argument("--remeasure", action="store_true", help="measure points already kept in --out again")
    args = parser.parse_args(argv)
    if args.what == "card":
        refresh_shipped_card(load_scaling(args.out))
        return
    if args.what == "curve":
        kind, wanted = "curve", {f"fraction-{f:g}": {"data_fraction": f} for f in args.fractions}
    else:
        names = args.only or list(ABLATIONS)
        unknown = sorted(set(names) - set(ABLATIONS))
        if unknown:
            parser.error(f"--only: unknown ablation(s) {unknown}; allowed: {sorted(ABLATIONS)}")
        # the baseline is the curve's point of that data share: trained once for both
        kind = "ablations"
        wanted = {f"fraction-{args.fraction:g}" if n == "baseline" else f"ablate-{n}-{args.fraction:g}":
                  {"data_fraction": args.fraction, **ABLATIONS[n]} for n in names}
    scaling = load_scaling(args.out)
    kept = {p["name"]: p for points in scaling.values() for p in points}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, overrides in wanted.items():
        point = kept.get(name)
        if point is not None and point.get("train") != point_config(overrides):
            # trained before a default of the recipe changed: kept, under a name that says how
            stale = {**point, "name": f"{name} ({recipe_label(point['train'])})"}
            scaling[kind] = merge_point(scaling.get(kind, []), stale)
        if args.remeasure or not reusable(point, overrides, args.mtbench):
            point = measure(name, overrides, args.work, args.mtbench)
        # written after every point: an interrupted command keeps what it measured
        scaling[kind] = merge_point(scaling.get(kind, []), point)
        (args.out / f"{kind}.json").write_text(json.dumps(scaling[kind], indent=1) + "\n")
    refresh_shipped_card(scaling)
    print(json.dumps(scaling[kind], indent=1))


if __name__ == "__main__":
    main()
