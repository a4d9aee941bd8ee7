"""Mixed-shape batches: shared step costs, the batch simulator, and batch-coordinated choice."""

import json

import numpy as np
import pytest
import torch

from vllm_respsp.policy.batch_sim import policy_chooser, simulate_batch
from vllm_respsp.policy.coordinate import Coordination, action_levels, coordinated_choice
from vllm_respsp.policy.cost import CostModel, StepWork, load_cost_model
from vllm_respsp.policy.policy_file import PolicyFileError, load_policy
from vllm_respsp.policy.shape_policy import ShapePolicy
from vllm_respsp.policy.simulator import simulate
from vllm_respsp.policy.traces import save_traces, synthetic_traces
from vllm_respsp.policy.train import main, select_features
from vllm_respsp.tree.shape import NO_DRAFTS, TreeShape, chain

ACTIONS = [chain(1), chain(3), TreeShape(8, 3, 4)]


def works(shapes):
    nominal = [StepWork.of(s) for s in shapes]
    return StepWork(*(np.array([getattr(w, f) for w in nominal], dtype=float)
                      for f in ("speculates", "levels", "rows", "nodes", "tree")))


def test_batch_step_of_one_shape_is_the_homogeneous_step():
    cost = load_cost_model("cpu-smollm2-135m-measured")
    for shape in ACTIONS + [NO_DRAFTS]:
        for batch in (1, 8):
            assert cost.batch_step_seconds(works([shape] * batch)) == \
                pytest.approx(cost.step_seconds(shape, batch))


def test_deepest_tree_sets_the_draft_passes_of_a_mixed_batch():
    cost = CostModel(("step", "draft_pass", "verify_tokens"), np.array([0.02, 0.003, 0.001]))
    mixed = cost.batch_step_seconds(works([chain(1), chain(1), chain(5)]))
    # one step, five passes (not 1 + 1 + 5), and every request's own verified tokens
    assert mixed == pytest.approx(0.02 + 5 * 0.003 + (2 + 2 + 6) * 0.001)
    # the homogeneous share a per-request simulator charges is lower
    shares = sum(cost.request_seconds(s, 3) for s in (chain(1), chain(1), chain(5)))
    assert shares < mixed


def test_batch_simulator_matches_the_walk_for_one_slot_and_static_shapes():
    traces = synthetic_traces(ACTIONS, num_generations=3, positions=50, hidden_size=2, seed=1)
    cost = load_cost_model("cpu-smollm2-135m-measured")
    for a in range(len(ACTIONS)):
        one = simulate_batch(traces, cost, a, batch=1)
        ref = simulate(traces, cost, a, batch=1)
        assert (one.tokens, one.steps) == (ref.tokens, ref.steps)
        assert one.seconds == pytest.approx(ref.seconds)
    # a static shape in a full batch: every step is the homogeneous step; only the generations
    # cut off at the end of the walk make the rates differ
    for batch in (3, 8):  # 8 > the 3 generations: the slots cycle through the set
        full = simulate_batch(traces, cost, 1, batch=batch)
        assert full.tokens >= 50 * max(3, 2 * batch)  # each finished generation: its 50 tokens
        assert full.tokens_per_s == pytest.approx(simulate(traces, cost, 1, batch=batch).tokens_per_s, rel=0.05)


def scores_for(values, coordination, load):
    i = coordination.nearest(load)
    return (torch.as_tensor(values, dtype=torch.float32) - coordination.target_mean[i]) \
        / coordination.target_std[i]


def test_coordination_prices_the_passes_once_per_step():
    actions = [chain(1), chain(4)]
    levels = torch.tensor(action_levels(actions))
    # one pass is worth 1 token at load 4 (rate 100 tok/s * 0.01 s)
    co = Coordination((4,), (0.5,), (2.0,), (100.0,), 0.01)
    # values as the bandit learned them: each request was charged levels / 4 of a pass
    own = np.array([[1.0, 1.2], [1.0, 1.2], [1.0, 1.2], [1.0, 3.0]])
    learned = own - np.array(action_levels(actions)) / 4
    scores = scores_for(learned, co, 4)
    assert scores.argmax(-1).tolist() == [0, 0, 0, 1]
    # L=1: 4.0 - 1 = 3.0; L=4: 1.2*3 + 3.0 - 4 = 2.6 -> every request stays shallow
    assert coordinated_choice(scores, levels, co, 4).tolist() == [0, 0, 0, 0]
    # when the deep request's gain pays for the three extra passes, all go deep
    own[3, 1] = 5.0
    learned = own - np.array(action_levels(actions)) / 4
    assert coordinated_choice(scores_for(learned, co, 4), levels, co, 4).tolist() == [1, 1, 1, 1]
    # alone, a request keeps its own argmax
    assert coordinated_choice(scores[3:], levels, co, 1).tolist() == [1]
    # all wanting the same depth: nothing to settle, whatever a pass costs
    same = scores_for(own[:3] - np.array(action_levels(actions)) / 4, co, 4)
    assert coordinated_choice(same, levels, co, 4).tolist() == same.argmax(-1).tolist()


def test_coordination_field_is_validated(tmp_path):
    save_traces(synthetic_traces(ACTIONS, num_generations=3, positions=40, hidden_size=4), tmp_path / "t")
    main(["--traces", str(tmp_path / "t.json"), "--profile", "cpu-smollm2-135m-measured",
          "--batch-loads", "1", "8", "--bandit-epochs", "1", "--algo", "bandit", "ppo",
          "--ppo-steps", "64", "--out", str(tmp_path / "p")])
    pf = load_policy(tmp_path / "p" / "bandit.json")
    assert pf.coordination.loads == (1, 8) and pf.coordination.pass_seconds > 0
    assert load_policy(tmp_path / "p" / "ppo.json").coordination is None  # logits are not values
    path = tmp_path / "p" / "bandit.json"
    meta = json.loads(path.read_text())
    meta["coordination"]["target_std"] = [1.0]
    path.write_text(json.dumps(meta))
    with pytest.raises(PolicyFileError, match="coordination.*target_std must be 2 finite numbers"):
        load_policy(path)


@pytest.mark.parametrize("seed", range(5))
def test_coordination_is_the_best_joint_choice(seed):
    """Brute force over every joint assignment: Σ own values - price · deepest passes."""
    import itertools

    rng = np.random.default_rng(seed)
    actions = [NO_DRAFTS, chain(1), chain(2), chain(4), TreeShape(6, 3, 2)]
    levels = np.array(action_levels(actions))
    # a batch of 6, four of them choosing now (the others hold): units of the nearest load, 8
    co = Coordination((1, 8), (0.0, 0.3), (1.0, 1.5), (50.0, 300.0), 0.002)  # 0.6 token a pass
    own = rng.normal(1.0, 0.6, (4, len(actions)))
    learned = own - 0.6 * levels / 6  # the share of passes the network charged at load 6
    picked = coordinated_choice(scores_for(learned, co, 6), torch.tensor(levels), co, 6).numpy()
    best = max(sum(own[i, a] for i, a in enumerate(joint)) - 0.6 * levels[list(joint)].max()
               for joint in itertools.product(range(len(actions)), repeat=4))
    got = own[np.arange(4), picked].sum() - 0.6 * levels[picked].max()
    assert got == pytest.approx(best, abs=1e-4)


def test_shape_policy_coordinates_a_batch_and_the_batch_simulator_runs_it(tmp_path):
    traces = synthetic_traces(ACTIONS, num_generations=6, positions=60, hidden_size=4, seed=3)
    save_traces(traces, tmp_path / "t")
    main(["--traces", str(tmp_path / "t.json"), "--profile", "cpu-smollm2-135m-measured",
          "--batch-loads", "1", "8", "--bandit-epochs", "3", "--algo", "bandit",
          "--out", str(tmp_path / "p")])
    policy = ShapePolicy.from_file(tmp_path / "p" / "bandit.json")
    feats = torch.as_tensor(np.stack([g.features[0] for g in traces.generations]))
    recent = torch.zeros(len(feats))
    extras = torch.stack([torch.full((6,), 3 / 6.0), recent], dim=1)
    scores = policy.net(torch.cat([feats, extras], dim=1))
    assert policy.forward(feats, recent, 8).tolist() == \
        coordinated_choice(scores, policy.levels, policy.coordination, 8).tolist()
    one = policy.forward(feats[:1], recent[:1], 1)
    alone = policy.net(torch.cat([feats[:1], torch.zeros(1, 2)], dim=1)).argmax(-1)
    assert one.tolist() == alone.tolist()
    cost = load_cost_model("cpu-smollm2-135m-measured")
    result = simulate_batch(traces.with_no_drafts(), cost, policy_chooser(policy), batch=4)
    assert result.tokens >= sum(g.num_positions for g in traces.generations)
    assert policy.fallback_count == 0
    wrong_width = select_features(traces, [])  # no feature blocks: the network cannot run
    with pytest.raises(ValueError, match="fell back"):
        simulate_batch(wrong_width, cost, policy_chooser(policy), batch=4)
