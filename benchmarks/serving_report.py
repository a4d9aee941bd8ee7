"""The serving benchmark's report: the Markdown table (whole loads and, for a varying load, phase
by phase) and the throughput, latency and acceptance plots (benchmarks/serving.py runs it)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.report import plot_accepted_per_step

PERCENTILES = (50, 90, 99)


def _fmt_pcts(p: dict) -> str:
    return "/".join("-" if p[f"p{q}"] is None else f"{p[f'p{q}']:.0f}" for q in PERCENTILES)


def markdown_table(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Command: `{result['command']}`  ",
        f"Date (UTC): {result['date']}; machine: {m['device']}, {m['cpus']} CPUs, vLLM {m['vllm']}, "
        f"torch {m['torch']}; OpenAI server on loopback, one at a time  ",
        f"Target: `{Path(result['model']).name}`; EAGLE-3 head: `{result['head']}`; "
        f"max tokens {result['settings']['max_tokens']}, temperature {result['settings']['temperature']}",
        *([] if result["complete"] else ["", "**Incomplete run** (stopped early): only the finished loads are shown."]),
        "",
        "Latencies in ms as p50/p90/p99. Load `cN`: N requests in flight, back to back; `R/s`: Poisson "
        "arrivals at R requests/s.",
        "",
        "| prompt set | load | configuration | output tok/s (median, min-max) | req/s | TTFT ms | TPOT ms | "
        "ITL ms | acceptance length | speedup vs none | vs best EAGLE-3 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    describe = {c["name"]: c["describe"] for c in result["configs"]}
    for cell in result["cells"]:
        for name, s in cell["configs"].items():
            vs_none = f"{s['speedup_vs_none']:.2f}x" if s["speedup_vs_none"] else "-"
            vs_chain = f"{s['speedup_vs_best_eagle3']:.2f}x" if s["speedup_vs_best_eagle3"] else "-"
            failed = f" ({s['failed']} failed)" if s["failed"] else ""
            lines.append(
                f"| {Path(cell['prompt_set']).name} | {cell['load']} | {describe[name]}{failed} | "
                f"{s['output_tokens_per_s']:.1f} "
                f"({s['output_tokens_per_s_min']:.1f}-{s['output_tokens_per_s_max']:.1f}) | "
                f"{s['requests_per_s']:.2f} | {_fmt_pcts(s['ttft_ms'])} | {_fmt_pcts(s['tpot_ms'])} | "
                f"{_fmt_pcts(s['itl_ms'])} | {s['acceptance_length']:.2f} | {vs_none} | {vs_chain} |")
        for k, phase in enumerate(cell.get("phases") or []):  # a varying load, phase by phase
            for name, s in cell["configs"].items():
                p = s["phases"][k]
                lines.append(
                    f"| {Path(cell['prompt_set']).name} | phase {k + 1}: c{phase['max_concurrency']} | "
                    f"{describe[name]} | "
                    f"{p['output_tokens_per_s']:.1f} | {p['requests_per_s']:.2f} | {_fmt_pcts(p['ttft_ms'])} | "
                    f"{_fmt_pcts(p['tpot_ms'])} | {_fmt_pcts(p['itl_ms'])} | {p['acceptance_length']:.2f} | - | - |")
    return "\n".join(lines) + "\n"


def plot_serving(result: dict, out: Path) -> list[Path]:
    """serving_throughput.png (output tok/s per load), serving_latency.png (TTFT and TPOT p50,
    with p90 as the top of a bar), serving_acceptance.png (accepted drafts per step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = list(dict.fromkeys(c["load"] for c in result["cells"]))
    configs = result["configs"]
    paths = [out / "serving_throughput.png", out / "serving_latency.png"]

    def series(set_name, name, key, sub=None):
        ys = []
        for load in loads:
            cell = next((c for c in result["cells"] if c["prompt_set"] == set_name and c["load"] == load), None)
            v = cell["configs"].get(name, {}).get(key) if cell else None
            ys.append(v[sub] if (sub and v) else v)
        return ys

    def throughput(ax, set_name):
        for c in configs:
            ax.plot(range(len(loads)), series(set_name, c["name"], "output_tokens_per_s"), marker="o",
                    label=c["describe"])
        ax.set_xlabel("load (cN: N in flight; R/s: Poisson rate)")
        ax.set_ylabel("output tokens/s")

    def latency(key):
        width = 0.8 / max(1, len(configs))

        def bars(ax, set_name):
            for j, c in enumerate(configs):
                p50 = [v if v is not None else 0 for v in series(set_name, c["name"], key, "p50")]
                p90 = [v if v is not None else 0 for v in series(set_name, c["name"], key, "p90")]
                xs = [i + (j - (len(configs) - 1) / 2) * width for i in range(len(loads))]
                ax.bar(xs, p50, width, label=c["describe"])
                ax.vlines(xs, p50, p90, color="black", lw=0.8)
            ax.set_ylabel(f"{key[:4].upper()} ms (p50, line to p90)")
        return bars

    _per_prompt_set(plt, result, loads, [throughput], paths[0], legend_size=8)
    _per_prompt_set(plt, result, loads, [latency("ttft_ms"), latency("tpot_ms")], paths[1], legend_size=7)
    acceptance = out / "serving_acceptance.png"
    if plot_accepted_per_step(result["cells"], configs,
                              lambda cell: f"{Path(cell['prompt_set']).name} {cell['load']}", acceptance):
        paths.append(acceptance)
    return paths


def _per_prompt_set(plt, result: dict, loads: list, rows: list, path: Path, legend_size: int) -> None:
    """One column per prompt set, one row per `draw(ax, prompt_set)` in `rows`, loads on the x axis."""
    sets = list(dict.fromkeys(c["prompt_set"] for c in result["cells"]))
    fig, axes = plt.subplots(len(rows), len(sets), figsize=(5 * len(sets), 0.5 + 3.5 * len(rows)), squeeze=False)
    for col, set_name in enumerate(sets):
        for row, draw in enumerate(rows):
            ax = axes[row][col]
            draw(ax, set_name)
            ax.set_xticks(range(len(loads)), loads)
            ax.set_title(Path(set_name).name)
    axes[0][0].legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: dict, out: Path) -> None:
    (out / "serving.md").write_text(markdown_table(result))
    plot_serving(result, out)


