"""The `respsp` speculative config: parsing, defaults and the errors a user sees.

    {"method": "respsp", "model": <EAGLE-3 head>,
     "shape": {"total_tokens": T, "depth": D, "top_k": K},   # the static / fallback shape
     "policy": "static" | "cycle" | <policy file>,
     "actions": [<shape>, ...],                              # what a policy may choose from
     "schedule": "policy" | "measured"}                      # with a policy file (policy/schedule.py)

Every problem is reported at start-up as one `RespspConfigError` that names the field and what
is allowed; nothing is left to fail later inside a request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vllm_respsp.tree.shape import DEFAULT_SHAPE, ShapeError, TreeShape, validate_actions

METHOD = "respsp"
RESPSP_KEYS = {"method", "model", "shape", "policy", "actions", "schedule"}
# "static": every request uses `shape`. "cycle": each request gets one of `actions`, fixed for
# the request and chosen by its prompt, so one batch mixes shapes (tests, demos, A/B runs).
POLICIES = ("static", "cycle")
# With a policy file: "policy" (the default) runs the policy alone; "measured" runs, at each
# load the policy may draft at, whichever of the policy, chains of 1-3 drafts or no drafts this
# engine measures fastest (policy/schedule.py). Opt-in: in the 2026-12-06 benchmark it did not
# beat the policy alone (benchmarks/results/throughput-20261206i).
SCHEDULES = ("policy", "measured")
EAGLE3_ARCHITECTURES = {"LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM", "Eagle3Speculator"}


class RespspConfigError(ValueError):
    """A bad `respsp` speculative config; the message names the field and the allowed values."""


@dataclass(frozen=True)
class RespspConfig:
    model: str
    shape: TreeShape = DEFAULT_SHAPE
    policy: str = "static"
    actions: tuple[TreeShape, ...] = field(default=())
    schedule: str = "policy"  # read only with a policy file

    @property
    def shapes(self) -> tuple[TreeShape, ...]:
        """Every shape a step may use: the static shape and the policy's actions."""
        return (self.shape,) + tuple(a for a in self.actions if a != self.shape)

    @property
    def max_depth(self) -> int:
        return max(s.depth for s in self.shapes)

    @property
    def max_total_tokens(self) -> int:
        return max(s.total_tokens for s in self.shapes)

    def to_dict(self) -> dict:
        out = {"method": METHOD, "model": self.model, "shape": self.shape.to_dict(), "policy": self.policy}
        if self.actions:
            out["actions"] = [a.to_dict() for a in self.actions]
        if self.policy not in POLICIES:
            out["schedule"] = self.schedule
        return out


def check_eagle3_head(path: str) -> None:
    folder = Path(path)
    config_file = folder / "config.json"
    if not folder.is_dir() or not config_file.is_file():
        raise RespspConfigError(
            f"model={path!r}: expected a local EAGLE-3 head folder with config.json and weights")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as e:
        raise RespspConfigError(f"model={path!r}: config.json is not valid JSON ({e})") from None
    archs = set(config.get("architectures") or [])
    if not archs & EAGLE3_ARCHITECTURES:
        raise RespspConfigError(
            f"model={path!r} is not an EAGLE-3 head (architectures {sorted(archs)}); "
            f"allowed: {sorted(EAGLE3_ARCHITECTURES)}")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise RespspConfigError(f"model={path!r}: no weights (*.safetensors or *.bin) in the folder")
    for weights in folder.glob("*.safetensors"):
        try:  # reads the header and checks the file holds every tensor it declares
            from safetensors import safe_open

            with safe_open(str(weights), "pt") as f:
                f.keys()
        except Exception as e:
            raise RespspConfigError(
                f"model={path!r}: {weights.name} is not a complete safetensors file ({e}); "
                f"re-export or re-download the head") from None


def check_policy_matches_target(cfg: RespspConfig, target_hidden_size: int) -> None:
    """A policy file trained for another target fails here, at start-up."""
    if cfg.policy not in POLICIES:
        _policy_file(cfg, target_hidden_size)


def check_head_matches_target(path: str, target_hidden_size: int, target_vocab_size: int) -> None:
    """A head trained for another target fails here, at start-up, not inside a request."""
    config = json.loads((Path(path) / "config.json").read_text())
    hidden = config.get("target_hidden_size") or config.get("hidden_size")
    vocab = config.get("vocab_size")
    if hidden != target_hidden_size or (vocab is not None and vocab != target_vocab_size):
        raise RespspConfigError(
            f"model={path!r} was built for a target with hidden size {hidden} and vocabulary "
            f"{vocab}; this target has hidden size {target_hidden_size} and vocabulary "
            f"{target_vocab_size}. Allowed: an EAGLE-3 head trained for this target")


def parse(raw: dict, max_tokens_per_request: int | None = None) -> RespspConfig:
    """Validate a user's `respsp` speculative config (the JSON object) into a RespspConfig."""
    if not isinstance(raw, dict):
        raise RespspConfigError(f"speculative_config must be an object, got {type(raw).__name__}")
    if raw.get("method") != METHOD:
        raise RespspConfigError(f"method must be {METHOD!r}, got {raw.get('method')!r}")
    unknown = set(raw) - RESPSP_KEYS
    if unknown:
        raise RespspConfigError(f"unknown key(s) {sorted(unknown)} in a respsp speculative_config; "
                                f"allowed: {sorted(RESPSP_KEYS)}")
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise RespspConfigError("model is required: the path of an EAGLE-3 draft head folder")
    check_eagle3_head(model)
    if "actions" in raw and not isinstance(raw["actions"], list):
        raise RespspConfigError("actions must be a list of shapes")
    try:
        shape = TreeShape.from_dict(raw["shape"]) if "shape" in raw else DEFAULT_SHAPE
        shape.validate("shape", max_tokens_per_request)
        if not shape.drafts:
            raise ShapeError(f"shape={shape} drafts nothing; the static shape must draft "
                             f"(total_tokens >= 1). {shape} is allowed only among actions")
        actions = tuple(validate_actions(raw["actions"], "actions", max_tokens_per_request)) \
            if "actions" in raw else ()
    except ShapeError as e:
        raise RespspConfigError(str(e)) from None
    policy = raw.get("policy", "static")
    if not isinstance(policy, str) or not policy:
        raise RespspConfigError(f"policy must be one of {list(POLICIES)} or the path of a policy file, got {policy!r}")
    if policy not in POLICIES and not Path(policy).is_file():
        raise RespspConfigError(f"policy={policy!r}: no such file; allowed: {list(POLICIES)} or a policy file path")
    if policy == "cycle" and "actions" not in raw:
        raise RespspConfigError('policy="cycle" picks each request\'s shape from actions: give "actions"')
    schedule = raw.get("schedule", "policy")
    if schedule not in SCHEDULES:
        raise RespspConfigError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    if "schedule" in raw and policy in POLICIES:
        raise RespspConfigError(f"schedule applies to a policy file; policy={policy!r} has none. "
                                f"Allowed: leave schedule out, or give a policy file")
    if policy not in POLICIES:
        actions = _policy_file(RespspConfig(model, shape, policy, actions)).actions
    return RespspConfig(model=model, shape=shape, policy=policy, actions=tuple(actions), schedule=schedule)


def _policy_file(cfg: RespspConfig, target_hidden_size: int | None = None):
    """Load and check the policy file (format, weights, action set; widths against the head)."""
    from vllm_respsp.policy.features import feature_dims
    from vllm_respsp.policy.policy_file import PolicyFileError, load_policy

    head = json.loads((Path(cfg.model) / "config.json").read_text())
    try:
        return load_policy(cfg.policy, config=cfg, hidden_size=target_hidden_size,
                           feature_dims=feature_dims(int(head["hidden_size"])))
    except PolicyFileError as e:
        raise RespspConfigError(f"policy: {e}") from None
