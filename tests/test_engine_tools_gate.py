"""engine_tools.gate: the load gate measured in the engine (its walk, its rule, the file it
rewrites). The engines themselves are `testbed.engines.EngineWorker`s, tested with the
benchmarks; here they are stood in for by workers whose speed is set per load."""

import argparse
import json

import pytest
import torch

from vllm_respsp.engine_tools import gate
from vllm_respsp.policy.policy_file import LoadShape, PolicyFileError, constant_policy, load_policy
from vllm_respsp.policy.shape_policy import ShapePolicy
from vllm_respsp.tree.shape import NO_DRAFTS, chain


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
    rows = (LoadShape(3, 4, chain(1)),)
    gate.write_gate(path, 4, rows)
    assert load_policy(path).max_draft_load == 4 and load_policy(path).static_loads == rows
    (tmp_path / "open").mkdir()
    copy = gate.open_gate_copy(path, tmp_path / "open")
    assert load_policy(copy).max_draft_load is None and load_policy(copy).static_loads == ()
    assert load_policy(path).max_draft_load == 4
    gate.write_gate(path, None)
    assert load_policy(path).max_draft_load is None and load_policy(path).static_loads == ()


def test_a_rerun_reads_the_simulators_gate_from_the_last_report(tmp_path):
    path = constant_policy(tmp_path / "p" / "chain2", chain(2), chain(1))
    assert gate.simulated_gate(path, 16, "abc") == 16  # never measured: the file's is the simulator's
    gate.report_path(path).write_text(json.dumps({"simulated_max_draft_load": 16, "weights_sha256": "abc"}))
    assert gate.simulated_gate(path, 4, "abc") == 16
    assert gate.simulated_gate(path, 4, "def") == 4  # retrained since: the report is of other weights


def test_the_policy_keeps_a_load_only_when_it_beats_every_chain_by_the_margin():
    assert gate.fastest_drafting({"none": 1.0, "policy": 1.5, "chain1": 1.47}, 0.03) == "chain1"  # a near tie
    assert gate.fastest_drafting({"none": 1.0, "policy": 1.6, "chain1": 1.5}, 0.03) == "policy"
    assert gate.fastest_drafting({"none": 1.0, "policy": 1.5, "chain1": 1.6, "chain2": 1.7}, 0.03) == "chain2"
    assert gate.fastest_drafting({"none": 1.0, "policy": 1.5}, 0.03) == "policy"


def test_static_loads_cover_the_loads_up_to_each_measured_load_a_chain_won():
    shapes = {"chain1": chain(1), "chain2": chain(2)}
    rows = {1: {"best": "policy"}, 2: {"best": "chain2"}, 4: {"best": "chain1"}, 8: {"best": "chain1"},
            16: {"best": "policy"}}
    assert gate.static_loads(rows, None, shapes) == (LoadShape(2, 2, chain(2)), LoadShape(3, 8, chain(1)))
    # never past the gate: a gate of 6 cuts the row that load 8's measurement gave
    assert gate.static_loads(rows, 6, shapes) == (LoadShape(2, 2, chain(2)), LoadShape(3, 6, chain(1)))
    assert gate.static_loads(rows, 2, shapes) == (LoadShape(2, 2, chain(2)),)
    assert gate.static_loads({1: {"best": "policy"}}, None, shapes) == ()


def test_a_static_load_runs_its_shape_without_the_network(tmp_path):
    path = constant_policy(tmp_path / "p" / "chain2", chain(2), chain(1))
    gate.write_gate(path, 8, (LoadShape(3, 4, chain(1)),))
    policy = ShapePolicy.from_file(path)
    features = torch.zeros(3, 8)
    assert policy.choose(["a", "b", "c"], features, torch.zeros(3), 3) == [chain(1)] * 3
    assert not policy.needs_network(["a", "b", "c"], 3)
    assert policy.choose(["a", "b"], features[:2], torch.zeros(2), 2) == [chain(2)] * 2  # the network's
    assert policy.needs_network(["x"], 5) and policy.choose(["x"], features[:1], torch.zeros(1), 5) == [chain(2)]
    assert policy.choose(["a"], features[:1], torch.zeros(1), 9) == [NO_DRAFTS]  # above the gate


def test_a_request_held_on_no_drafts_drafts_at_a_static_load(tmp_path):
    """The runtime skips the root of a request whose next shape is known to draft nothing; at a
    static load its held NO_DRAFTS does not count: the row's shape drafts."""
    path = constant_policy(tmp_path / "p" / "none", NO_DRAFTS, chain(1))
    gate.write_gate(path, 8, (LoadShape(3, 4, chain(1)),))
    policy = ShapePolicy.from_file(path)
    assert policy.choose(["a"], torch.zeros(1, 8), torch.zeros(1), 1) == [NO_DRAFTS]  # held from now on
    assert policy.drafts_nothing_next("a", 1) and policy.drafts_nothing_next("a", 2)
    assert not policy.drafts_nothing_next("a", 3)
    assert policy.choose(["a", "b", "c"], torch.zeros(3, 8), torch.zeros(3), 3) == [chain(1)] * 3


@pytest.mark.parametrize("rows, message", [
    ([{"loads": [4, 3], "shape": chain(1).to_dict()}], "1 <= first <= last"),
    ([{"loads": [1, 4], "shape": chain(1).to_dict()}, {"loads": [4, 8], "shape": chain(1).to_dict()}],
     "after the previous row's last load"),
    ([{"loads": [1, 2], "shape": chain(3).to_dict()}], "drafts more than the policy's actions allow"),
    ([{"loads": [1, 2], "shape": NO_DRAFTS.to_dict()}], "load gate's"),
    ([{"loads": [1], "shape": chain(1).to_dict()}], "must be"),
])
def test_static_loads_are_checked_field_by_field(tmp_path, rows, message):
    """(A row may run a shape that is not an action, within the actions' budgets: see
    test_further_static_shapes_are_measured_beside_the_chains.)"""
    path = constant_policy(tmp_path / "p" / "chain2", chain(2), chain(1))
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "static_loads": rows}))
    with pytest.raises(PolicyFileError, match=r"static_loads\[\d\]") as error:
        load_policy(path)
    assert message in str(error.value)


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
               "policy": PacedWorker({1: 0.5, 2: 0.9, 4: 1.2, 8: 0.5}),
               "chain1": PacedWorker({1: 0.6, 2: 0.8, 4: 1.1, 8: 0.5})}
    args = argparse.Namespace(min_prompts=4, max_tokens=32, reps=2, margin=0.03, batching="static")
    rows = gate.measure(workers, list(range(16)), [1, 2, 4, 8], args, Bar())
    assert list(rows) == [1, 2, 4]  # load 8 is never run: the gate is shut from 4
    assert [rows[load]["best"] for load in rows] == ["policy", "chain1", "chain1"]
    assert rows[1]["ratio"] == pytest.approx(2.0) and rows[4]["ratio"] == pytest.approx(1.0 / 1.1)
    assert gate.measured_limit({k: r["ratio"] for k, r in rows.items()}, 0.03) == 2
    # per load: one untimed warm-up batch, then each repetition from an empty prefix cache
    assert workers["policy"].calls[:5] == [(1, 16, False), (1, 32, True), (1, 32, False), (1, 32, False),
                                           (1, 32, False)]


def test_further_static_shapes_are_measured_beside_the_chains(tmp_path, capsys):
    args = gate.parse_args(["--policy", "p.json", "--chains", "1", "2", "--shapes", "chain1/v0.4"])
    assert args.static_shapes == {"chain1": chain(1), "chain2": chain(2), "chain1/v0.4": chain(1, 0, 0.4)}
    # the shape a load's fastest mode names is what its static_loads row runs
    rows = gate.static_loads({4: {"best": "chain1/v0.4"}}, None, args.static_shapes)
    assert rows == (LoadShape(1, 4, chain(1, 0, 0.4)),)
    # though not one of the policy's actions: within their budgets, the file loads and runs it
    path = constant_policy(tmp_path / "p" / "chain2", chain(2), chain(1))
    gate.write_gate(path, 8, rows)
    assert load_policy(path).static_loads == rows
    assert ShapePolicy.from_file(path).choose(["a"], torch.zeros(1, 8), torch.zeros(1), 3) == [chain(1, 0, 0.4)]
    for bad, said in (("chain1/v1.5", "verify_min_prob must be a number in"), ("none", "name drafting shapes"),
                      ("tree", "expected chainN")):
        with pytest.raises(SystemExit):
            gate.parse_args(["--policy", "p.json", "--shapes", bad])
        assert said in capsys.readouterr().err


def test_a_static_shape_beyond_the_actions_budget_stops_the_gate_before_any_engine(tmp_path):
    path = constant_policy(tmp_path / "p" / "chain2", chain(2), chain(1))
    with pytest.raises(SystemExit, match="chain3/v0.4: shape T3/D3/K1/v0.4 drafts more than"):
        gate.main(["--policy", str(path), "--chains", "1", "--shapes", "chain3/v0.4"])
