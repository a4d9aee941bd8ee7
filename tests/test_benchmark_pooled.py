"""benchmarks.pooled: the samples of several runs of one command, pooled per configuration."""

import json

import pytest

from benchmarks import pooled


def run(out: str, none: list[float], respsp: list[float], command: str = "python -m benchmarks.throughput --reps 2"):
    """A throughput.json with one cell: samples of 100 tokens at these tokens/s."""
    def samples(rates):
        return [{"rep": i, "engine": 0, "output_tokens": 100, "seconds": 100 / r} for i, r in enumerate(rates)]
    return {"command": f"{command} --out {out}", "raw": {"mt-bench/bs4/continuous": {
        "none": samples(none), "respsp-policy-bandit": samples(respsp)}}}


def test_runs_of_one_command_pool_their_samples(tmp_path):
    for name, none, respsp in (("a", [100, 110], [90, 120]), ("b", [104, 96], [130, 100])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "throughput.json").write_text(json.dumps(run(name, none, respsp)))
    text = pooled.main([str(tmp_path / "a"), str(tmp_path / "b")])
    # none: median of 96, 100, 104, 110 = 102; respsp: of 90, 100, 120, 130 = 110 -> 110 / 102
    assert "| none | 102.0 | 4 |" in text and "| respsp-policy-bandit | 110.0 | 4 | 1.078 |" in text


def test_runs_of_different_commands_are_refused():
    with pytest.raises(ValueError, match="different commands"):
        other = run("b", [1], [1], command="python -m benchmarks.throughput --reps 3")
        pooled.pooled_samples([run("a", [1], [1]), other])
