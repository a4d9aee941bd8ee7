"""Old/new A/B table from alternated throughput runs (each run: one rep of every column)."""
import json, sys, statistics
from pathlib import Path
root = Path(sys.argv[1])
runs = {tag: json.loads((root / tag / "throughput.json").read_text()) for tag in ["old_1", "new_1", "old_2", "new_2"]}
names = None
rows = []
for b_i, cell in enumerate(runs["old_1"]["cells"]):
    batch = cell["batch_size"]
    for name in cell["configs"]:
        vals, rel, acc = {}, {}, {}
        for tag, d in runs.items():
            c = d["cells"][b_i]["configs"][name]
            vals[tag] = c["tokens_per_s"]
            rel[tag] = c["tokens_per_s"] / d["cells"][b_i]["configs"]["none"]["tokens_per_s"]
            acc[tag] = c["acceptance_length"]
        old = statistics.mean([vals["old_1"], vals["old_2"]]); new = statistics.mean([vals["new_1"], vals["new_2"]])
        rows.append((batch, runs["old_1"]["cells"][b_i]["configs"][name].get("describe", name), name, vals, rel, acc, new / old))
print("| batch | configuration | old run 1 | new run 1 | old run 2 | new run 2 | new / old (mean of runs) | acceptance old / new |")
print("|---:|---|---:|---:|---:|---:|---:|---:|")
for batch, desc, name, vals, rel, acc, ratio in rows:
    cells = " | ".join(f"{vals[t]:.1f} ({rel[t]:.2f}x)" for t in ["old_1", "new_1", "old_2", "new_2"])
    print(f"| {batch} | {name} | {cells} | {ratio:.3f} | {acc['old_1']:.2f} / {acc['new_1']:.2f} |")
