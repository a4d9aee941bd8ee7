"""The policy report: learned policies vs the best static shape vs the per-step oracle, per
held-out prompt set, batch load and cost profile (simulated on recorded traces, design.md §6).
Also shown: no speculation, EAGLE-3's default tree, and (where the action set has
confidence-bounded shapes) the best single bounded shape, each tuned on the training traces.

    python -m benchmarks.policy_report RUN_DIR [RUN_DIR ...] --out benchmarks/results/policy-<date>

Each RUN_DIR is the --out folder of one `python -m vllm_respsp.policy.train` run (one cost
profile); its report.json holds tokens/s per held-out set and batch load. Writes
<out>.md (table) and <out>.png (bars per set and load).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(report: dict):
    policies = sorted(report["files"])
    # a run on post-draft features is an upper bound, not a servable policy: say so in its name
    tag = " (bound: sees the drafted trees)" if "drafted_scores" in report.get("features", []) else ""
    for set_name, by_load in report["tokens_per_s_on_eval"].items():
        for load, row in sorted(by_load.items(), key=lambda kv: int(kv[0])):
            for policy in policies:
                static, oracle, got = row["best_static"], row["oracle"], row[policy]
                gap = oracle - static
                yield {"profile": report["profile"], "set": set_name, "load": int(load), "policy": policy + tag,
                       "no_speculation": row["no_speculation"], "eagle3_default": row.get("eagle3_default"),
                       "best_static": static, "best_static_action": row["best_static_action"],
                       "best_bounded": row.get("best_bounded"), "best_bounded_action": row.get("best_bounded_action"),
                       "oracle": oracle, "tokens_per_s": got, "vs_best_static": got / static,
                       "gap_closed": (got - static) / gap if gap > 0 else float("nan"),
                       "acceptance_length": row.get(f"{policy}_acceptance_length"),
                       "best_static_in_batch": row.get("best_static_in_batch"),
                       "in_batch": row.get(f"{policy}_in_batch"),
                       "in_batch_per_request": row.get(f"{policy}_in_batch_per_request")}


def markdown(all_rows: list[dict], sources: list[str]) -> str:
    out = ["Simulated tokens/s on held-out traces (exact at temperature 0; cost from each profile). "
           "Best static shape tuned on the training traces separately for each load.",
           "", "Runs: " + ", ".join(f"`{s}`" for s in sources), "",
           "| profile | prompt set | load | policy | no spec | EAGLE-3 default | best static (shape) | "
           "best bounded (shape) | policy | oracle | policy / best static | gap closed | policy AL |",
           "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in all_rows:
        e3 = f"{r['eagle3_default']:.1f}" if r["eagle3_default"] else "not recorded"
        bounded = f"{r['best_bounded']:.1f} ({r['best_bounded_action']})" if r["best_bounded"] else "-"
        al = f"{r['acceptance_length']:.2f}" if r["acceptance_length"] else "-"
        out.append(f"| {r['profile']} | {r['set']} | {r['load']} | {r['policy']} | {r['no_speculation']:.1f} | "
                   f"{e3} | {r['best_static']:.1f} ({r['best_static_action']}) | {bounded} | "
                   f"{r['tokens_per_s']:.1f} | {r['oracle']:.1f} | {r['vs_best_static']:.3f}x | "
                   f"{100 * r['gap_closed']:.0f}% | {al} |")
    batched = [r for r in all_rows if r["in_batch"] is not None]
    if batched:
        out += ["", "In mixed batches (`policy.batch_sim`: requests of different shapes share each step, "
                "whose draft passes are those of its deepest tree). The policy as the engine runs it "
                "(a bandit's choices coordinated on one number of passes per step) and, for a bandit, "
                "each request's own argmax:", "",
                "| profile | prompt set | load | policy | best static | policy, per request | policy, as served | "
                "as served / best static |", "|---|---|---:|---|---:|---:|---:|---:|"]
        for r in batched:
            own = f"{r['in_batch_per_request']:.1f}" if r["in_batch_per_request"] else "-"
            out.append(f"| {r['profile']} | {r['set']} | {r['load']} | {r['policy']} | "
                       f"{r['best_static_in_batch']:.1f} ({r['best_static_action']}) | {own} | "
                       f"{r['in_batch']:.1f} | {r['in_batch'] / r['best_static_in_batch']:.3f}x |")
    return "\n".join(out) + "\n"


def plot(all_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["profile"], r["set"]) for r in all_rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (profile, set_name) in zip(axes[0], panels):
        sel = [r for r in all_rows if (r["profile"], r["set"]) == (profile, set_name)]
        loads = sorted({r["load"] for r in sel})
        policies = sorted({r["policy"] for r in sel})
        bars = ["no_speculation", "best_static"] + (["best_bounded"] if sel[0]["best_bounded"] else []) \
            + [*policies, "oracle"]
        width = 0.8 / len(bars)
        shown = []
        for i, bar in enumerate(bars):
            values = []
            for load in loads:
                row = next(r for r in sel if r["load"] == load and (bar not in policies or r["policy"] == bar))
                values.append((row["tokens_per_s"] if bar in policies else row[bar]) / row["best_static"])
            ax.bar([j + i * width for j in range(len(loads))], values, width, label=bar.replace("_", " "))
            shown += values
        ax.axhline(1.0, color="grey", lw=0.8)
        # the differences are a few percent: start the axis near the lowest bar, not at 0
        ax.set_ylim(max(0.0, min(shown) - 0.05), max(shown) + 0.3)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(loads))], [f"load {b}" for b in loads])
        ax.set_ylabel("tokens/s relative to the best static shape")
        ax.set_title(f"{set_name} ({profile})")
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="policy.train --out folders")
    ap.add_argument("--out", required=True, help="output stem: writes <out>.md and <out>.png")
    args = ap.parse_args(argv)
    all_rows = [r for run in args.runs for r in rows(json.loads((Path(run) / "report.json").read_text()))]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown(all_rows, args.runs))
    plot(all_rows, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
