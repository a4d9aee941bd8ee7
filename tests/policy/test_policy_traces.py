"""Trace table format: round trip, validation errors, and the synthetic generator's structure."""

import json

import numpy as np
import pytest

from vllm_respsp.policy.traces import TraceError, load_traces, save_traces, synthetic_traces
from vllm_respsp.tree.shape import NO_DRAFTS, TreeShape, chain

ACTIONS = [chain(1), chain(3), TreeShape(8, 3, 4), TreeShape(16, 5, 4), TreeShape(32, 6, 8)]


@pytest.fixture
def traces():
    return synthetic_traces(ACTIONS, num_generations=3, positions=40, hidden_size=4, seed=1)


def test_round_trip(traces, tmp_path):
    save_traces(traces, tmp_path / "t")
    back = load_traces(tmp_path / "t.json")
    assert back.actions == ACTIONS and back.feature_dim == 12 and back.temperature == 0.0
    assert back.target["hidden_size"] == 4
    for a, b in zip(traces.generations, back.generations):
        assert (a.prompt_id, a.prompt_set) == (b.prompt_id, b.prompt_set)
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.accepted, b.accepted)
        assert b.accepted.dtype == np.int16 and b.features.dtype == np.float32


def test_synthetic_acceptance_is_monotone_and_capped(traces):
    acc = np.concatenate([g.accepted for g in traces.generations])
    depth = np.array([a.depth for a in ACTIONS])
    assert (acc <= depth).all() and (acc >= 0).all()
    # chain(1) <= chain(3); (8,3,4) >= chain(3) (wider, same depth); bigger trees accept more
    assert (acc[:, 0] <= acc[:, 1]).all()
    assert (acc[:, 1] <= acc[:, 2]).all()
    assert (acc[:, 2] <= acc[:, 3]).all() and (acc[:, 3] <= acc[:, 4]).all()
    assert acc[:, 4].mean() > acc[:, 0].mean() + 0.5  # there is something to gain


def test_unknown_version_is_rejected(traces, tmp_path):
    _, meta = save_traces(traces, tmp_path / "t")
    raw = json.loads(meta.read_text())
    raw["version"] = 99
    meta.write_text(json.dumps(raw))
    with pytest.raises(TraceError, match="unknown trace format version 99"):
        load_traces(tmp_path / "t")


def test_shape_mismatch_is_named(traces, tmp_path):
    _, meta = save_traces(traces, tmp_path / "t")
    raw = json.loads(meta.read_text())
    raw["actions"] = raw["actions"][:-1]  # one action fewer than the table's columns
    meta.write_text(json.dumps(raw))
    with pytest.raises(TraceError, match=r"accepted has shape .* expected \[positions, 4\]"):
        load_traces(tmp_path / "t")


def test_truncated_weights_are_reported(traces, tmp_path):
    weights, _ = save_traces(traces, tmp_path / "t")
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(TraceError, match="unreadable safetensors"):
        load_traces(tmp_path / "t")


def test_nonzero_temperature_is_rejected(traces):
    traces.temperature = 0.7
    with pytest.raises(TraceError, match="temperature must be 0"):
        traces.validate()


def test_split_keeps_generations_whole(traces):
    train, held = traces.split(0.34, seed=0)
    assert len(train.generations) == 2 and len(held.generations) == 1
    ids = {g.prompt_id for g in train.generations} | {g.prompt_id for g in held.generations}
    assert len(ids) == 3


def test_no_drafts_column_is_zeros_and_added_once(traces):
    with_none = traces.with_no_drafts()
    assert with_none.actions == traces.actions + [NO_DRAFTS]
    for g, h in zip(traces.generations, with_none.generations):
        np.testing.assert_array_equal(h.accepted[:, :-1], g.accepted)
        assert not h.accepted[:, -1].any()
    assert with_none.validate().with_no_drafts() is with_none
