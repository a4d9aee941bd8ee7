"""Policy files: what training writes and what the engine loads (`"policy": <path>` in the
respsp config points at the JSON).

    <stem>.json          format, version, action set, feature spec + extras, target/head ids,
                         architecture, hold (action persistence), cost profile name + digest,
                         training info, the weights file's name and sha256, and for a bandit
                         the units of its scores (`coordination`, see policy/coordinate.py),
                         and `max_draft_load` when drafting stops paying above some batch load
                         (policy/simulator.py: the load gate), and `static_loads` where one
                         static shape for every request was measured faster than the policy
                         (engine_tools.gate)
    <stem>.safetensors   PolicyNet's state dict

Loading checks everything before the engine serves a request, and every error names the field:
an unknown version, an action set that differs from the respsp config's `actions`, a feature
width that does not match the target ("trained for hidden size 576, loaded for 4096"), missing
or mis-shaped tensors, a truncated or corrupt weights file (sha256).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vllm_respsp.policy.coordinate import Coordination
from vllm_respsp.policy.features import ROOT_PROBS
from vllm_respsp.policy.network import ACTIVATIONS, PolicyNet
from vllm_respsp.policy.simulator import EXTRA_FEATURES
from vllm_respsp.policy.traces import FeatureSpec, feature_width
from vllm_respsp.tree.shape import ShapeError, TreeShape, validate_actions

POLICY_FORMAT = "respsp-shape-policy"
POLICY_FORMAT_VERSION = 1


class PolicyFileError(ValueError):
    """A policy file that cannot be used; the message names the file and the field."""


@dataclass
class PolicyFile:
    path: Path
    meta: dict
    net: PolicyNet
    actions: list[TreeShape]
    feature_spec: list[FeatureSpec]
    hold: int
    coordination: Coordination | None = None
    max_draft_load: int | None = None  # above this batch load nothing drafts (simulator.draft_load_limit)
    static_loads: tuple[LoadShape, ...] = ()  # loads where every request runs one static shape


@dataclass(frozen=True)
class LoadShape:
    """At batch loads `first`..`last` every request runs `shape` and the network is not asked:
    the engine measured that static shape faster than the policy there (engine_tools.gate; the
    policy's in-batch simulation sees part of it: a batch's deepest tree sets its draft passes).
    Like a row `[start_bs, end_bs, K]` of vLLM's `num_speculative_tokens_per_batch_size`."""

    first: int
    last: int
    shape: TreeShape

    def to_dict(self) -> dict:
        return {"loads": [self.first, self.last], "shape": self.shape.to_dict()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_policy(stem: str | Path, net: PolicyNet, actions: list[TreeShape],
                feature_spec: list[FeatureSpec], *, hold: int = 1, target: dict | None = None,
                head: dict | None = None, cost_profile: dict | None = None,
                training: dict | None = None, coordination: Coordination | None = None,
                max_draft_load: int | None = None, static_loads=()) -> Path:
    """Write <stem>.safetensors and <stem>.json; return the JSON's path (the policy file)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = stem.with_suffix(".safetensors")
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(weights))
    meta = {
        "format": POLICY_FORMAT, "version": POLICY_FORMAT_VERSION,
        "actions": [a.to_dict() for a in actions],
        "feature_spec": [f.to_dict() for f in feature_spec],
        "extras": list(EXTRA_FEATURES),
        "target": target or {}, "head": head or {},
        "architecture": net.architecture, "hold": hold,
        "cost_profile": cost_profile or {}, "training": training or {},
        "weights": {"file": weights.name, "sha256": _sha256(weights)},
    }
    if coordination is not None:
        meta["coordination"] = coordination.to_dict()
    if max_draft_load is not None:
        meta["max_draft_load"] = max_draft_load
    if static_loads:
        meta["static_loads"] = [r.to_dict() for r in static_loads]
    path = stem.with_suffix(".json")
    path.write_text(json.dumps(meta, indent=1))
    return path


CONSTANT_HOLD = 1 << 20  # steps: longer than any request


def constant_policy(stem: str | Path, shape: TreeShape, fallback: TreeShape) -> Path:
    """A policy file that picks `shape` for every request at every step.

    NO_DRAFTS cannot be a static shape (config.py: that is no speculation, which skips the
    head), so the runtime reaches it only through a policy; `engine_tools.profile` times it with
    this one. Zero weights and a one-hot head bias make the argmax constant, so the choice is
    held for as long as a request lives (`CONSTANT_HOLD`): the network is never asked again and a
    request held on NO_DRAFTS skips the draft head (its positions are deferred). A constant
    NO_DRAFTS policy also carries `max_draft_load` 0: nothing drafts at any load, so every step
    is the one a shut load gate gives (the runtime's `_hold_everyone`).
    """
    actions = [fallback] if shape == fallback else [fallback, shape]
    net = PolicyNet(ROOT_PROBS, len(EXTRA_FEATURES), len(actions), proj_dim=1, hidden=(1,))
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.head.bias[actions.index(shape)] = 1.0
    return save_policy(stem, net, actions, [FeatureSpec("draft_root_probs", ROOT_PROBS)], hold=CONSTANT_HOLD,
                       training={"algo": "constant", "shape": str(shape)},
                       max_draft_load=None if shape.drafts else 0)


def _fail(path, field: str, message: str):
    raise PolicyFileError(f"policy file {path}: field {field!r}: {message}")


def load_policy(path: str | Path, *, config=None, hidden_size: int | None = None,
                feature_dims: dict[str, int] | None = None) -> PolicyFile:
    """Load and check a policy file.

    config        a RespspConfig: its `actions` (when given) must be the policy's action set
    hidden_size   the target model's hidden size, when the engine knows it
    feature_dims  {feature name: width} the engine will feed, e.g. {"eagle3_fused": 3 * 4096}
    """
    path = Path(path)
    meta = _read_meta(path)
    actions = _check_actions(path, meta, config)
    spec = _check_features(path, meta, hidden_size, feature_dims)
    hold = meta.get("hold")
    if not isinstance(hold, int) or hold < 1:
        _fail(path, "hold", f"must be a positive integer, got {hold!r}")
    arch = _check_architecture(path, meta, spec, actions)
    coordination = None
    if "coordination" in meta:
        try:
            coordination = Coordination.from_dict(meta["coordination"])
        except ValueError as e:
            _fail(path, "coordination", str(e))
    max_draft_load = meta.get("max_draft_load")
    if max_draft_load is not None and (type(max_draft_load) is not int or max_draft_load < 0):
        _fail(path, "max_draft_load", f"must be null or an integer >= 0 (a batch load), got {max_draft_load!r}")
    static_loads = _check_static_loads(path, meta, actions)
    net = PolicyNet(arch["feature_dim"], arch["extra_dim"], arch["num_actions"], arch["proj_dim"],
                    tuple(arch["hidden"]), arch["activation"])
    net.load_state_dict(_load_weights(path, meta, net))
    return PolicyFile(path, meta, net.eval(), actions, spec, hold, coordination, max_draft_load, static_loads)


def _read_meta(path: Path) -> dict:
    if not path.is_file():
        raise PolicyFileError(f"policy file {path}: no such file")
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise PolicyFileError(f"policy file {path}: not valid JSON ({e}); truncated?") from None
    if not isinstance(meta, dict) or meta.get("format") != POLICY_FORMAT:
        _fail(path, "format", f"expected {POLICY_FORMAT!r}; is this a policy file?")
    if meta.get("version") != POLICY_FORMAT_VERSION:
        _fail(path, "version", f"unknown version {meta.get('version')!r}; this code reads "
                               f"version {POLICY_FORMAT_VERSION}")
    return meta


def _check_actions(path: Path, meta: dict, config) -> list[TreeShape]:
    try:
        actions = validate_actions(meta.get("actions") or [], "actions")
    except ShapeError as e:
        _fail(path, "actions", str(e))
    if config is not None and config.actions and set(config.actions) != set(actions):
        missing = sorted(map(str, set(actions) - set(config.actions)))
        extra = sorted(map(str, set(config.actions) - set(actions)))
        _fail(path, "actions", f"the policy chooses among {len(actions)} shapes but the respsp "
                               f"config's actions differ (in the policy only: {missing}; in the "
                               f"config only: {extra}); use the policy's action set or retrain")
    return actions


def _check_features(path: Path, meta: dict, hidden_size: int | None,
                    feature_dims: dict[str, int] | None) -> list[FeatureSpec]:
    try:
        spec = [FeatureSpec(str(f["name"]), int(f["dim"])) for f in meta["feature_spec"]]
    except (KeyError, TypeError, ValueError):
        _fail(path, "feature_spec", "must be a list of {name, dim}")
    if meta.get("extras") != list(EXTRA_FEATURES):
        _fail(path, "extras", f"{meta.get('extras')!r}; this code builds {list(EXTRA_FEATURES)}")
    trained_hidden = (meta.get("target") or {}).get("hidden_size")
    if hidden_size is not None and trained_hidden is not None and trained_hidden != hidden_size:
        _fail(path, "target.hidden_size", f"a policy trained for hidden size {trained_hidden} "
                                          f"loaded for a target of hidden size {hidden_size}")
    for f in spec:
        want = (feature_dims or {}).get(f.name)
        if want is not None and want != f.dim:
            _fail(path, f"feature_spec.{f.name}", f"trained for width {f.dim}, the engine "
                                                  f"provides width {want}")
    return spec


def beyond_actions(shape: TreeShape, actions: list[TreeShape]) -> str | None:
    """Why a `static_loads` row cannot run `shape` beside these actions, or None. The engine's
    budgets come from the action set (vLLM's num_speculative_tokens: the most total_tokens), so a
    row may run any shape within them, e.g. a chain with a verify bound."""
    most_tokens, deepest = max(a.total_tokens for a in actions), max(a.depth for a in actions)
    if shape.total_tokens > most_tokens or shape.depth > deepest:
        return (f"shape {shape} drafts more than the policy's actions allow "
                f"(total_tokens <= {most_tokens}, depth <= {deepest})")
    return None


def _check_static_loads(path: Path, meta: dict, actions: list[TreeShape]) -> tuple[LoadShape, ...]:
    """`static_loads`: rows {"loads": [first, last], "shape": a drafting shape within the budgets
    of the policy's actions}, 1 <= first <= last, in increasing order without overlap."""
    rows, after = [], 0
    for i, row in enumerate(meta.get("static_loads") or []):
        field = f"static_loads[{i}]"
        try:
            first, last = (int(x) for x in row["loads"])
            shape = TreeShape.from_dict(row["shape"], f"{field}.shape")
        except ShapeError as e:
            _fail(path, field, str(e))
        except (KeyError, TypeError, ValueError):
            _fail(path, field, f"must be {{\"loads\": [first, last], \"shape\": {{...}}}}, got {row!r}")
        if not after < first <= last:
            _fail(path, field, f"loads {[first, last]} must have 1 <= first <= last and start after "
                               f"the previous row's last load ({after})")
        if not shape.drafts:
            _fail(path, field, "NO_DRAFTS: loads where nothing drafts are the load gate's (max_draft_load)")
        beyond = beyond_actions(shape, actions)
        if beyond:
            _fail(path, field, beyond)
        rows.append(LoadShape(first, last, shape))
        after = last
    return tuple(rows)


def _check_architecture(path: Path, meta: dict, spec: list[FeatureSpec], actions) -> dict:
    arch = meta.get("architecture") or {}
    expect = {"feature_dim": feature_width(spec), "extra_dim": len(EXTRA_FEATURES),
              "num_actions": len(actions)}
    for key, value in expect.items():
        if arch.get(key) != value:
            _fail(path, f"architecture.{key}", f"{arch.get(key)!r}, inconsistent with the file's "
                                               f"feature spec / action set ({value})")
    if arch.get("activation") not in ACTIVATIONS or not isinstance(arch.get("hidden"), list) \
            or not isinstance(arch.get("proj_dim"), int):
        _fail(path, "architecture", f"needs proj_dim, hidden (list) and activation in "
                                    f"{sorted(ACTIVATIONS)}; got {arch}")
    return arch


def _load_weights(path: Path, meta: dict, net: PolicyNet) -> dict:
    info = meta.get("weights") or {}
    weights = path.parent / str(info.get("file"))
    if not weights.is_file():
        _fail(path, "weights.file", f"{weights} does not exist")
    if _sha256(weights) != info.get("sha256"):
        _fail(path, "weights.sha256", f"{weights.name} does not match its recorded hash "
                                      f"(truncated, corrupt or replaced)")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        _fail(path, "weights.file", f"unreadable safetensors ({e})")
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    if missing or unknown:
        _fail(path, "weights", f"tensors missing: {missing}, unexpected: {unknown}")
    for name, t in expected.items():
        if tuple(tensors[name].shape) != tuple(t.shape):
            _fail(path, f"weights.{name}", f"shape {tuple(tensors[name].shape)}, the "
                                           f"architecture needs {tuple(t.shape)}")
    return {k: v.float() for k, v in tensors.items()}
