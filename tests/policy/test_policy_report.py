"""benchmarks.policy_report on a tiny synthetic training run: table rows and ratios, plot file."""

import json

from benchmarks.policy_report import main as report_main
from vllm_respsp.policy.train import main as train_main


def test_report_table_and_plot(tmp_path):
    train_main(["--synthetic", "--out", str(tmp_path / "run"), "--algo", "bandit", "--batch-loads", "1", "8",
                "--bandit-epochs", "1", "--synthetic-generations", "4", "--synthetic-positions", "32"])
    report_main([str(tmp_path / "run"), "--out", str(tmp_path / "policy")])
    table = (tmp_path / "policy.md").read_text().splitlines()
    body = [line for line in table if line.startswith("| cpu-smollm2-135m")]
    assert len(body) == 3  # one row per (set, load, policy), then the mixed-batch row of load 8
    row = json.loads((tmp_path / "run" / "report.json").read_text())["tokens_per_s_on_eval"]["eval"]["8"]
    ratio = row["bandit"] / row["best_static"]
    assert f"{ratio:.3f}x" in body[1] and f"({row['best_static_action']})" in body[1]
    served = row["bandit_in_batch"] / row["best_static_in_batch"]
    assert f"| {row['bandit_in_batch_per_request']:.1f} | {row['bandit_in_batch']:.1f} | {served:.3f}x |" in body[2]
    assert (tmp_path / "policy.png").stat().st_size > 1000
