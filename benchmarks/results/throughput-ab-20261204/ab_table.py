"""The old/new table of README.md, from the four alternated runs (one repetition of every
column each): python ab_table.py <this folder>"""

import json
import statistics
import sys
from pathlib import Path

RUNS = ["old_1", "new_1", "old_2", "new_2"]


def main(root: Path) -> None:
    runs = {tag: json.loads((root / tag / "throughput.json").read_text()) for tag in RUNS}
    print("| batch | configuration | old run 1 | new run 1 | old run 2 | new run 2 | new / old (mean of runs) "
          "| acceptance old / new |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for i, cell in enumerate(runs["old_1"]["cells"]):
        for name in cell["configs"]:
            per_run = {tag: run["cells"][i]["configs"] for tag, run in runs.items()}
            speed = {tag: c[name]["tokens_per_s"] for tag, c in per_run.items()}
            shown = " | ".join(f"{speed[t]:.1f} ({speed[t] / per_run[t]['none']['tokens_per_s']:.2f}x)" for t in RUNS)
            ratio = statistics.mean([speed["new_1"], speed["new_2"]]) / \
                statistics.mean([speed["old_1"], speed["old_2"]])
            accept = " / ".join(f"{per_run[t][name]['acceptance_length']:.2f}" for t in ("old_1", "new_1"))
            print(f"| {cell['batch_size']} | {name} | {shown} | {ratio:.3f} | {accept} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
