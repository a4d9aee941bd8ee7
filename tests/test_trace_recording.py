"""Trace recording in the real engine (runtime.recorder + engine_tools.record): the recorded roots are
the engine's output, and each action's tree is walked along it to its accepted length."""

import json
from argparse import Namespace

import numpy as np
from conftest import run_engine

from vllm_respsp.engine_tools.record import accepted_lengths, already_recorded, assemble, recording_recipe
from vllm_respsp.policy.pools import pool_shape
from vllm_respsp.policy.traces import FeatureSpec, TraceSet, save_traces, synthetic_traces
from vllm_respsp.runtime.recorder import read_records
from vllm_respsp.tree.shape import NO_DRAFTS, TreeShape


def test_walking_trees_along_an_output():
    # two trees rooted at output index 0 and 1; output = 10 11 12 13
    #   tree 0: root -> 11 -> 12, root -> 99        accepted 2
    #   tree 1: root -> 12 -> 77, root -> 12 -> 13  accepted 2 (second path), 77 rejected
    tokens = np.array([10, 11, 99, 12, 11, 12, 12, 77, 13])
    parents = np.array([-1, 0, 0, 1, -1, 0, 0, 1, 2])
    depths = np.array([0, 1, 1, 2, 0, 1, 1, 2, 2])
    cu = np.array([0, 4, 9])
    output = np.array([10, 11, 12, 13])
    assert accepted_lengths((tokens, parents, depths, cu), np.array([0, 1]), output).tolist() == [2, 2]
    # a matching token under a rejected parent does not count; nothing past the output's end
    assert accepted_lengths((np.array([12, 5, 13]), np.array([-1, 0, 1]), np.array([0, 1, 2]),
                             np.array([0, 3])), np.array([2]), output).tolist() == [0]
    assert accepted_lengths((np.array([13, 14]), np.array([-1, 0]), np.array([0, 1]),
                             np.array([0, 2])), np.array([3]), output).tolist() == [0]


def test_recording_in_the_engine_gives_exact_tables(fixture_models, tmp_path):
    """The successor head is always right: every action accepts its whole depth (capped by
    the tokens left), and the recorded roots are exactly the greedy output. One pool per width
    is recorded; a confidence-bounded shape derived from it keeps only the sure chain."""
    actions = [{"total_tokens": 3, "depth": 3, "top_k": 1}, {"total_tokens": 8, "depth": 4, "top_k": 2}]
    prompts = [[5, 9, 30], [100, 7], [3]]
    records = tmp_path / "trace.records"
    job = {"model": str(fixture_models["successor"]), "prompts": prompts,
           "samplings": [{"temperature": 0.0, "max_tokens": 12, "ignore_eos": True}],
           "engine": {"dtype": "float32", "max_model_len": 128},
           "speculative_config": {"method": "respsp", "model": str(fixture_models["successor_head"]),
                                  "shape": actions[0], "actions": actions + [NO_DRAFTS.to_dict()]}}
    result = run_engine(job, env={"VLLM_RESPSP_RECORD": str(records)})["results"][0]
    outputs = result["token_ids"]
    assert outputs == [[(p[-1] + 1 + i) % 128 for i in range(12)] for p in prompts]
    # recording proposes nothing (vLLM may still schedule a step of -1 placeholders once: all rejected)
    assert result["spec"]["accepted_tokens"] == 0
    generations, pools, names = assemble(
        read_records(str(records)), {tuple(p): o for p, o in zip(prompts, outputs)},
        {tuple(p): (f"p{i}", "fixture") for i, p in enumerate(prompts)})
    assert pools == [pool_shape(3, 1), pool_shape(4, 2)]  # NO_DRAFTS: no tree, zeros by definition
    assert names == ["draft_root_hidden", "eagle3_fused", "draft_root_probs"]
    bounded = TreeShape(8, 4, 2, 0.5)
    traces = TraceSet([], [FeatureSpec("all", 264)], list(generations.values())).with_actions(
        [TreeShape.from_dict(a) for a in actions] + [bounded, NO_DRAFTS]).validate()
    for g in traces.generations:
        assert g.features.shape == (11, 128 + 128 + 8)
        left = 11 - np.arange(11)  # tokens after position p that a tree can still match
        assert g.accepted[:, 0].tolist() == np.minimum(3, left).tolist()
        assert g.accepted[:, 1].tolist() == np.minimum(4, left).tolist()
        assert g.accepted[:, 2].tolist() == np.minimum(4, left).tolist()
        assert not g.accepted[:, 3].any()
        assert np.allclose(g.features[:, -8].max(), g.features[:, -8]) and g.features[0, -8] > 0.9
        # both trees verify 8 nodes over 4 levels; the bounded one expands only the sure node
        # of each level (1 + 3 rows instead of 1 + 3 * 2)
        assert (g.work.nodes[:, 1:3] == 8).all() and (g.work.levels[:, 1:3] == 4).all()
        assert (g.work.rows[:, 1] == 7).all() and (g.work.rows[:, 2] == 4).all()


def test_a_rerun_skips_a_set_recorded_with_the_same_head_and_arguments(tmp_path):
    """`make policy` after an interruption reuses finished recordings; a new head (or other
    arguments, or a damaged trace file) records again."""
    head, model = tmp_path / "head", tmp_path / "model"
    for folder, content in ((head, b"head weights"), (model, b"target weights")):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(content)
    args = Namespace(prompts="mt-bench", num_prompts=80, max_tokens=128, out="x", force=False, check=[])
    out = tmp_path / "mt-bench"
    recipe = recording_recipe(args, str(head), str(model))
    assert not already_recorded(str(out), recipe)  # nothing there yet
    save_traces(synthetic_traces([TreeShape.parse("chain2")], num_generations=2, positions=5, hidden_size=4), out)
    (tmp_path / "mt-bench.report.json").write_text(json.dumps({"recipe": recipe}))
    assert already_recorded(str(out), recipe)
    assert already_recorded(str(out), recording_recipe(Namespace(**{**vars(args), "out": "y", "force": True}),
                                                       str(head), str(model)))
    assert not already_recorded(str(out), recording_recipe(Namespace(**{**vars(args), "num_prompts": 40}),
                                                           str(head), str(model)))
    (head / "model.safetensors").write_bytes(b"retrained head")
    assert not already_recorded(str(out), recording_recipe(args, str(head), str(model)))
    (tmp_path / "mt-bench.safetensors").write_bytes(b"truncated")
    assert not already_recorded(str(out), recipe)
