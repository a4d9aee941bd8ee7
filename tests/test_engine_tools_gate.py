"""engine_tools.gate: the load gate measured in the engine (its walk, its rule, the file it
rewrites). The engines themselves are `testbed.engines.EngineWorker`s, tested with the
benchmarks; here they are stood in for by workers whose speed is set per load."""

import argparse

import pytest

from vllm_respsp.engine_tools import gate
from vllm_respsp.policy.policy_file import constant_policy, load_policy
from vllm_respsp.tree.shape import chain


def test_the_measured_limit_is_the_last_load_of_the_first_paying_run():
    assert gate.measured_limit({1: 1.2, 2: 1.05, 4: 1.01, 8: 1.2}, margin=0.03) == 2
    assert gate.measured_limit({1: 1.02}, margin=0.03) == 0  # a near tie is not worth drafting
    assert gate.measured_limit({1: 1.1, 2: 1.1}, margin=0.03) == 2


def test_the_shipped_gate_is_never_wider_than_the_simulators():
    loads = [1, 2, 4, 8]
    assert gate.combined_gate(16, 2, loads) == 2  # measured narrower: it wins
    assert gate.combined_gate(1, 4, loads) == 1  # the simulator's is narrower
    assert gate.combined_gate(None, 4, loads) == 4
    assert gate.combined_gate(16, 8, loads) == 16  # paid at every load tried: the simulator's stands
    assert gate.combined_gate(None, 8, loads) is None


def test_the_open_copy_has_no_gate_and_the_rewrite_round_trips(tmp_path):
    path = constant_policy(tmp_path / "p" / "chain2", chain(2), chain(1))
    gate.set_max_draft_load(path, 4)
    assert load_policy(path).max_draft_load == 4
    (tmp_path / "open").mkdir()
    copy = gate.open_gate_copy(path, tmp_path / "open")
    assert load_policy(copy).max_draft_load is None and load_policy(path).max_draft_load == 4
    gate.set_max_draft_load(path, None)
    assert load_policy(path).max_draft_load is None


class PacedWorker:
    """Generates one token per prompt in `seconds_at[load]` seconds a batch."""

    def __init__(self, seconds_at):
        self.seconds_at, self.calls = seconds_at, []

    def generate(self, prompts, sampling, fresh_prefix_cache=False):
        self.calls.append((len(prompts), sampling["max_tokens"], fresh_prefix_cache))
        return {"output_tokens": len(prompts), "seconds": self.seconds_at.get(len(prompts), 1.0)}


class Bar:
    def update(self, n):
        pass

    def write(self, text):
        pass


def test_the_walk_stops_at_the_first_load_where_the_policy_does_not_pay():
    workers = {"none": PacedWorker({1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0}),
               "policy": PacedWorker({1: 0.5, 2: 0.9, 4: 1.2, 8: 0.5})}
    args = argparse.Namespace(min_prompts=4, max_tokens=32, reps=2, margin=0.03)
    rows = gate.measure(workers, list(range(16)), [1, 2, 4, 8], args, Bar())
    assert list(rows) == [1, 2, 4]  # load 8 is never run: the gate is shut from 4
    assert rows[1]["ratio"] == pytest.approx(2.0) and rows[4]["ratio"] == pytest.approx(1.0 / 1.2)
    assert gate.measured_limit({k: r["ratio"] for k, r in rows.items()}, 0.03) == 2
    # per load: one untimed warm-up batch, then each repetition from an empty prefix cache
    assert workers["policy"].calls[:5] == [(1, 16, False), (1, 32, True), (1, 32, False), (1, 32, False),
                                           (1, 32, False)]
