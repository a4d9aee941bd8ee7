"""Cost model: the fit recovers known coefficients; the shipped CPU profile fits design.md §5."""

import numpy as np
import pytest

from vllm_respsp.policy.cost import ProfileError, fit, load_cost_model, load_profile, parse_profile
from vllm_respsp.tree.shape import NO_DRAFTS, TreeShape, chain

TRUE = {"step": 0.020, "speculation": 0.006, "draft_pass": 0.003, "draft_rows": 0.0002,
        "verify_tokens": 0.0007, "sequences": 0.001}


def synthetic_profile(noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    shapes = [chain(2), chain(5), TreeShape(8, 3, 4), TreeShape(16, 5, 4), TreeShape(32, 6, 8),
              TreeShape(60, 8, 10)]
    for batch in (1, 4, 16):
        for q in (1, 16, 64):
            rows.append({"q_tokens": q, "batch": batch})
        for s in shapes:
            rows.append({"shape": s.to_dict(), "batch": batch})
    for r in rows:
        shape = TreeShape(**r["shape"]) if "shape" in r else None
        q = shape.total_tokens + 1 if shape else r["q_tokens"]
        b = r["batch"]
        t = TRUE["step"] + TRUE["verify_tokens"] * b * q + TRUE["sequences"] * b
        if shape:
            t += TRUE["speculation"] + TRUE["draft_pass"] * shape.depth
            t += TRUE["draft_rows"] * b * (1 + (shape.depth - 1) * shape.top_k)
        r["seconds"] = t * (1 + noise * rng.standard_normal())
        r["context"] = 256
    return {"name": "synthetic", "source": "test", "terms": list(TRUE), "rows": rows,
            "default_context": 256}


def test_fit_recovers_known_coefficients():
    model = fit(parse_profile(synthetic_profile()))
    np.testing.assert_allclose(model.coefficients, list(TRUE.values()), rtol=1e-6)
    assert model.step_seconds(chain(2), 1) == pytest.approx(0.020 + 0.006 + 0.006 + 0.0021 + 0.001 + 0.0004)


def test_fit_with_noise_is_close():
    model = fit(parse_profile(synthetic_profile(noise=0.01, seed=3)))
    np.testing.assert_allclose(model.coefficients, list(TRUE.values()), rtol=0.25)


def test_fit_keeps_coefficients_nonnegative():
    raw = synthetic_profile()
    raw["terms"] = ["step", "speculation", "draft_pass", "verify_tokens", "sequences", "attention"]
    for r in raw["rows"]:
        r["seconds"] *= 1 - 0.05 * (r["batch"] > 1)  # rows that would pull one term below 0
    model = fit(parse_profile(raw))
    assert (model.coefficients >= 0).all()


def test_shipped_cpu_profile_matches_design_notes():
    profile = load_profile("cpu-smollm2-135m")
    assert profile.source.startswith("design.md §5 measurements")
    model = load_cost_model("cpu-smollm2-135m")
    for row in profile.rows:  # every measured row within 15 %
        from vllm_respsp.policy.cost import basis
        pred = basis(model.terms, row.shape, row.batch, row.context, row.q_tokens) @ model.coefficients
        assert pred == pytest.approx(row.seconds, rel=0.15)
    # drafting is counted: a deeper chain costs more, a wider tree costs more than a chain
    assert model.step_seconds(chain(5)) > model.step_seconds(chain(2)) > model.step_seconds(None)
    assert model.request_seconds(chain(2), 64) < model.request_seconds(chain(2), 1)


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r.pop("terms"), "field 'terms' is required"),
    (lambda r: r.update(terms=["step", "warp_drive"]), "unknown: \\['warp_drive'\\]"),
    (lambda r: r["rows"][0].update(seconds=-1), "rows\\[0\\]: seconds must be a positive"),
    (lambda r: r["rows"][0].update(shape={"total_tokens": 2, "depth": 2, "top_k": 1}),
     "exactly one of 'shape' or 'q_tokens'"),
])
def test_bad_profiles_name_the_field(mutate, match):
    raw = synthetic_profile()
    mutate(raw)
    with pytest.raises(ProfileError, match=match):
        parse_profile(raw)


def test_unknown_profile_name():
    with pytest.raises(ProfileError, match="no shipped profile of that name; shipped: \\[") as raised:
        load_profile("gpu-h200-made-up")
    for name in ("cpu-smollm2-135m", "cpu-smollm2-135m-measured", "cpu-avx512-smollm2-135m-measured"):
        assert repr(name) in str(raised.value)


def test_no_drafts_pays_the_root_pass_but_verifies_one_token():
    model = fit(parse_profile(synthetic_profile()))
    for batch in (1, 16):
        saved = model.step_seconds(chain(1), batch) - model.step_seconds(NO_DRAFTS, batch)
        assert saved == pytest.approx(TRUE["verify_tokens"] * batch)  # one draft token per request
        overhead = model.step_seconds(NO_DRAFTS, batch) - model.step_seconds(None, batch)
        assert overhead == pytest.approx(TRUE["speculation"] + TRUE["draft_pass"] + TRUE["draft_rows"] * batch)


def test_tree_terms_charge_trees_not_chains():
    raw = synthetic_profile()
    raw["terms"] += ["tree_step", "tree_requests", "tree_rows"]
    for r in raw["rows"]:
        if "shape" in r and r["shape"]["top_k"] > 1:
            q = r["shape"]["total_tokens"] + 1
            r["seconds"] += 0.010 + r["batch"] * (0.004 + 0.0001 * q)
    model = fit(parse_profile(raw))
    np.testing.assert_allclose(model.coefficients, list(TRUE.values()) + [0.010, 0.004, 0.0001], rtol=1e-6)
    assert model.step_seconds(chain(5), 4) == pytest.approx(
        fit(parse_profile(synthetic_profile())).step_seconds(chain(5), 4))


def test_a_held_no_drafts_row_prices_a_plain_step():
    """NO_DRAFTS timed with the choice held (the profile's constant policy) runs no head pass:
    its row is fitted as StepWork.held (a plain step), not as a step that drafts."""
    raw = synthetic_profile()
    for batch in (1, 4, 16):
        t = TRUE["step"] + (TRUE["verify_tokens"] + TRUE["sequences"]) * batch
        raw["rows"].append({"shape": NO_DRAFTS.to_dict(), "batch": batch, "seconds": t, "held": True})
    model = fit(parse_profile(raw))
    np.testing.assert_allclose(model.coefficients, list(TRUE.values()), rtol=1e-6)


@pytest.mark.parametrize("row, match", [
    ({"shape": {"total_tokens": 2, "depth": 2, "top_k": 1}, "held": True}, "true only for NO_DRAFTS"),
    ({"shape": {"total_tokens": 0, "depth": 0, "top_k": 0}, "held": "yes"}, "held must be true or false"),
])
def test_held_is_only_for_no_drafts_rows(row, match):
    raw = synthetic_profile()
    raw["rows"].append({**row, "batch": 1, "seconds": 0.03})
    with pytest.raises(ProfileError, match=f"rows\\[{len(raw['rows']) - 1}\\].*{match}"):
        parse_profile(raw)
