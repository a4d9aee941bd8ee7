"""Markdown table and PNG plots of a throughput run (benchmarks/throughput.py's JSON)."""

from __future__ import annotations

from pathlib import Path


def markdown_table(result: dict) -> str:
    lines = [
        f"Command: `{result['command']}`  ",
        f"Date (UTC): {result['date']}; machine: {result['machine']['device']}, "
        f"{result['machine']['cpus']} CPUs, vLLM {result['machine']['vllm']}, torch {result['machine']['torch']}  ",
        f"Target: `{Path(result['model']).name}`; EAGLE-3 head: `{result['head']}`",
        *([] if result.get("complete", True) else
          ["", "**Incomplete run** (stopped early): only the finished cells are shown."]),
        "",
        "| prompt set | batch | configuration | tokens/s (median, min-max) | ms / output token | "
        "acceptance length | speedup vs none | vs best EAGLE-3 | outputs = no speculation | lossless |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    describe = {c["name"]: c["describe"] for c in result["configs"]}
    for cell in result["cells"]:
        for name, s in cell["configs"].items():
            vs_chain = f"{s['speedup_vs_best_eagle3']:.2f}x" if s["speedup_vs_best_eagle3"] else "-"
            lines.append(
                f"| {Path(cell['prompt_set']).name} | {batch_label(cell)} | {describe[name]} | "
                f"{s['tokens_per_s']:.1f} ({s['tokens_per_s_min']:.1f}-{s['tokens_per_s_max']:.1f}) | "
                f"{s['ms_per_output_token']:.1f} | {s['acceptance_length']:.2f} | "
                f"{s['speedup_vs_none']:.2f}x | {vs_chain} | {s.get('identical_to_none', '-')} | "
                f"{s.get('lossless', {}).get('label', '-')}{fallback_note(s)}{schedule_note(s)} |")
    return "\n".join(lines) + "\n"


def cell_batching(cell: dict) -> str:
    return cell.get("batching", "static")  # runs before 2026-12-06 batched statically


def batch_label(cell: dict) -> str:
    """The batch column: "4" for groups of 4 run to their end, "4 continuous" for 4 in flight."""
    batching = cell_batching(cell)
    return str(cell["batch_size"]) + ("" if batching == "static" else f" {batching}")


def fallback_note(summary: dict) -> str:
    """respsp's fallbacks by kind, flagged (FALLBACKS) above 1% of request-steps."""
    fallbacks = summary.get("respsp_fallbacks") or {}
    if not fallbacks:
        return ""
    text = ", ".join(f"{kind} {n}" for kind, n in sorted(fallbacks.items()))
    return f"; **FALLBACKS** {text}" if summary.get("respsp_fallbacks_flag") else f"; fallbacks {text}"


def schedule_note(summary: dict) -> str:
    """The share of steps respsp's measured schedule ran in each mode, most first."""
    modes = summary.get("respsp_schedule_steps") or {}
    total = sum(modes.values())
    if not total:
        return ""
    return "; steps " + ", ".join(f"{m} {100 * n / total:.0f}%" for m, n in
                                  sorted(modes.items(), key=lambda kv: -kv[1]))


def plot_speedups(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(c["prompt_set"], cell_batching(c)) for c in result["cells"]})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        set_name, batching = panel
        cells = sorted((c for c in result["cells"] if (c["prompt_set"], cell_batching(c)) == panel),
                       key=lambda c: c["batch_size"])
        for config in result["configs"]:
            xs = [c["batch_size"] for c in cells]
            ys = [c["configs"][config["name"]]["speedup_vs_none"] for c in cells]
            ax.plot(xs, ys, marker="o", label=config["describe"])
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size" if batching == "static" else "requests in flight")
        ax.set_ylabel("speedup vs no speculation")
        ax.set_title(f"{Path(set_name).name} ({batching})" if len({b for _, b in panels}) > 1 else Path(set_name).name)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_acceptance(result: dict, path: Path) -> None:
    plot_accepted_per_step(result["cells"], result["configs"],
                           lambda cell: f"{Path(cell['prompt_set']).name} bs{batch_label(cell)}", path)


def plot_accepted_per_step(cells: list[dict], configs: list[dict], label, path: Path) -> bool:
    """One panel per speculative configuration: the fraction of steps that accepted exactly k
    drafts, one line per cell (`label(cell)` names it), from vLLM's per-position counts:
    P(accepted >= k) = accepted_at_position[k-1] / drafts. False (nothing drawn) without one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec_configs = [c for c in configs if c["speculative_config"]]
    if not spec_configs:
        return False
    fig, axes = plt.subplots(1, len(spec_configs), figsize=(4 * len(spec_configs), 3.5), squeeze=False)
    for ax, config in zip(axes[0], spec_configs):
        for cell in cells:
            at_least = [1.0] + cell["configs"][config["name"]]["acceptance_per_pos"]
            exactly = [a - b for a, b in zip(at_least, at_least[1:] + [0.0])]
            ax.plot(range(len(exactly)), exactly, marker="o", label=label(cell))
        ax.set_title(config["describe"])
        ax.set_xlabel("draft tokens accepted in a step")
        ax.set_ylabel("fraction of steps")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(result: dict, out: Path) -> None:
    (out / "throughput.md").write_text(markdown_table(result))
    plot_speedups(result, out / "speedup_vs_batch.png")
    plot_acceptance(result, out / "acceptance_hist.png")


if __name__ == "__main__":
    # python -m benchmarks.report benchmarks/results/<run>: table and plots again from its JSON
    # (e.g. after an interrupted run, whose finished cells are in throughput.json).
    import json
    import sys

    run = Path(sys.argv[1])
    write_report(json.loads((run / "throughput.json").read_text()), run)
    print((run / "throughput.md").read_text())
