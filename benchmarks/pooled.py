"""Medians over the samples of several runs of one `benchmarks.throughput` command.

On the 2-core VMs here one configuration's samples spread by +-8% (more on a noisy day), so one
run of 6 samples a configuration cannot resolve a 2% gap. Running the same command again and
pooling the raw samples of every run (each run interleaved on its own) gives the medians of 12 or
18 samples; each run's own table stays in its folder.

    python -m benchmarks.pooled benchmarks/results/throughput-20261207i benchmarks/results/throughput-20261207j

Prints, per cell, each configuration's pooled median tokens/s, its number of samples, and respsp's
ratio to the best configuration that is not respsp's (no speculation, vLLM's chains, K by batch
size).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def pooled_samples(runs: list[dict]) -> dict[str, dict[str, list[float]]]:
    """{cell: {configuration: tokens/s of every sample of every run}}; the runs must share their
    command but for --out (else their samples are not of one experiment)."""
    commands = {_without_out(run["command"]) for run in runs}
    if len(commands) > 1:
        raise ValueError(f"the runs were made by different commands: {sorted(commands)}")
    out: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for cell, configs in run["raw"].items():
            for name, samples in configs.items():
                out.setdefault(cell, {}).setdefault(name, []).extend(
                    s["output_tokens"] / s["seconds"] for s in samples)
    return out


def _without_out(command: str) -> str:
    words = command.split()
    return " ".join(w for i, w in enumerate(words) if w != "--out" and (i == 0 or words[i - 1] != "--out"))


def table(samples: dict[str, dict[str, list[float]]]) -> str:
    rows = ["| cell | configuration | tokens/s (pooled median) | samples | respsp / best other |",
            "|---|---|---:|---:|---:|"]
    for cell, configs in samples.items():
        medians = {name: statistics.median(values) for name, values in configs.items()}
        others = [m for name, m in medians.items() if not name.startswith("respsp")]
        best = max(others, default=None)
        for name, median in medians.items():
            ratio = f"{median / best:.3f}" if name.startswith("respsp") and best else ""
            rows.append(f"| {cell} | {name} | {median:.1f} | {len(configs[name])} | {ratio} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="folders (or throughput.json files) of the runs")
    args = parser.parse_args(argv)
    paths = [p / "throughput.json" if p.is_dir() else p for p in args.runs]
    text = table(pooled_samples([json.loads(p.read_text()) for p in paths]))
    print(text)
    return text


if __name__ == "__main__":
    main()
