"""Trace tables: the accepted length of every action at every position of recorded generations.

At temperature 0 a generation's text does not depend on the shapes chosen, so one recording
gives, for every position p (a token index of the continuation) and every action a (a tree
shape), the number of draft tokens A[p, a] that action's tree would have had accepted there
(design.md §6). Together with the state features the drafter sees at p, that table is an exact
environment for shape policies.

Recorded traces also carry draft pools (`pools.py`): every candidate of a few wide, deep
beams at every position, from which the table of *any* shape they cover, confidence-bounded
ones included, is derived (`with_actions`), together with each step's work (draft levels,
rows, verified nodes), which for a bounded shape depends on the position. Tables without
pools (synthetic traces) have their actions' nominal work.

On disk a trace set is two files next to each other:
    <stem>.safetensors   g{i}.features float32 [P_i, F], g{i}.accepted int16 [P_i, num_actions],
                         g{i}.work int16 [P_i, num_actions, 5] (StepWork fields; optional),
                         g{i}.pool{j}.scores float32 [P_i, N_j], .matched uint8, .parents int16
                         (optional)
    <stem>.json          format version, action set, pool shapes, feature spec, target/head ids,
                         temperature, and per generation: prompt id, prompt set, number of positions
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from vllm_respsp.policy.cost import StepWork
from vllm_respsp.policy.pools import DraftPool, PoolError, realize
from vllm_respsp.tree.shape import NO_DRAFTS, ShapeError, TreeShape, validate_actions

TRACE_FORMAT_VERSION = 2
WORK_FIELDS = tuple(f.name for f in fields(StepWork))


class TraceError(ValueError):
    """A trace set that cannot be used; the message names the file and field."""


@dataclass(frozen=True)
class FeatureSpec:
    """One named block of the per-position state vector, e.g. ("eagle3_fused", 3 * hidden)."""

    name: str
    dim: int

    def to_dict(self) -> dict:
        return {"name": self.name, "dim": self.dim}


def feature_width(spec: list[FeatureSpec]) -> int:
    return sum(f.dim for f in spec)


@dataclass
class Generation:
    """One recorded generation: state features and accepted lengths per position."""

    prompt_id: str
    prompt_set: str
    features: np.ndarray  # float32 [P, F]
    accepted: np.ndarray  # int16 [P, num_actions]
    work: StepWork | None = None  # fields int [P, num_actions]; None: each action's nominal work
    pools: list[DraftPool] = field(default_factory=list)

    @property
    def num_positions(self) -> int:
        return int(self.accepted.shape[0])

    def action_work(self, actions: list[TreeShape]) -> StepWork:
        """Work of every action at every position ([P, A] fields), nominal where not recorded."""
        if self.work is not None:
            return self.work
        nominal = [StepWork.of(a) for a in actions]
        return StepWork(*(np.broadcast_to(np.array([getattr(w, f) for w in nominal]),
                                          self.accepted.shape) for f in WORK_FIELDS))


@dataclass
class TraceSet:
    actions: list[TreeShape]
    feature_spec: list[FeatureSpec]
    generations: list[Generation]
    target: dict = field(default_factory=dict)  # e.g. {"name": ..., "hidden_size": 576}
    head: dict = field(default_factory=dict)  # e.g. {"name": ..., "draft_vocab": 32000}
    temperature: float = 0.0

    @property
    def num_actions(self) -> int:
        return len(self.actions)

    @property
    def feature_dim(self) -> int:
        return feature_width(self.feature_spec)

    def validate(self, where: str = "trace set") -> TraceSet:
        try:
            validate_actions(self.actions, "actions")
        except ShapeError as e:
            raise TraceError(f"{where}: {e}") from None
        if self.temperature != 0.0:
            # The table is only exact for greedy decoding (design.md §6).
            raise TraceError(f"{where}: temperature must be 0 for an exact trace table, "
                             f"got {self.temperature}")
        for f in self.feature_spec:
            if not isinstance(f.dim, int) or f.dim < 1:
                raise TraceError(f"{where}: feature_spec {f.name!r} needs a positive dim, got {f.dim!r}")
        max_depth = np.array([a.depth for a in self.actions])
        for i, g in enumerate(self.generations):
            tag = f"{where}: generation {i} ({g.prompt_set}/{g.prompt_id})"
            if g.features.ndim != 2 or g.features.shape[1] != self.feature_dim:
                raise TraceError(f"{tag}: features have shape {tuple(g.features.shape)}, expected "
                                 f"[positions, {self.feature_dim}] from feature_spec")
            if g.accepted.ndim != 2 or g.accepted.shape[1] != self.num_actions:
                raise TraceError(f"{tag}: accepted has shape {tuple(g.accepted.shape)}, expected "
                                 f"[positions, {self.num_actions}] (one column per action)")
            if g.features.shape[0] != g.accepted.shape[0]:
                raise TraceError(f"{tag}: {g.features.shape[0]} feature rows but "
                                 f"{g.accepted.shape[0]} accepted rows")
            if g.features.dtype != np.float32 or g.accepted.dtype != np.int16:
                raise TraceError(f"{tag}: dtypes must be float32 features and int16 accepted, got "
                                 f"{g.features.dtype} and {g.accepted.dtype}")
            if g.accepted.size and (g.accepted.min() < 0 or (g.accepted > max_depth).any()):
                raise TraceError(f"{tag}: accepted lengths must lie in 0..depth of their action")
            if g.work is not None and any(np.shape(getattr(g.work, f)) != g.accepted.shape
                                          for f in WORK_FIELDS):
                raise TraceError(f"{tag}: work must be [positions, {self.num_actions}] per field")
            if [p.shape for p in g.pools] != self.pool_shapes or any(
                    p.scores.shape[0] != g.num_positions for p in g.pools):
                raise TraceError(f"{tag}: pools must be {list(map(str, self.pool_shapes))}, "
                                 f"one row per position")
        return self

    @property
    def pool_shapes(self) -> list[TreeShape]:
        return [p.shape for p in self.generations[0].pools] if self.generations else []

    def with_no_drafts(self) -> TraceSet:
        """These traces with NO_DRAFTS appended to the actions (unless they hold it already).

        A request that drafts nothing accepts nothing, so its column is zeros by definition and
        recordings need not carry it.
        """
        if NO_DRAFTS in self.actions:
            return self
        return self.with_actions(self.actions + [NO_DRAFTS])

    def with_actions(self, actions: list[TreeShape]) -> TraceSet:
        """These traces with the table of `actions`: derived from the pools when recorded (any
        shape they cover), else the existing columns (NO_DRAFTS: zeros by definition)."""
        actions = list(actions)
        generations = []
        for g in self.generations:
            cols, works = [], []
            own = g.action_work(self.actions)
            for a in actions:
                if a in self.actions:
                    i = self.actions.index(a)
                    cols.append(g.accepted[:, i])
                    works.append(StepWork(*(getattr(own, f)[:, i] for f in WORK_FIELDS)))
                elif a == NO_DRAFTS:
                    cols.append(np.zeros(g.num_positions, np.int16))
                    works.append(StepWork(*(np.full(g.num_positions, getattr(StepWork.of(a), f))
                                            for f in WORK_FIELDS)))
                elif g.pools:
                    try:
                        accepted, work = realize(g.pools, a)
                    except PoolError as e:
                        raise TraceError(str(e)) from None
                    cols.append(accepted)
                    works.append(work)
                else:
                    raise TraceError(f"action {a}: not in these traces' actions "
                                     f"{list(map(str, self.actions))} and no pools to derive it from")
            work = StepWork(*(np.stack([getattr(w, f) for w in works], 1).astype(np.int16)
                              for f in WORK_FIELDS)) if (g.work is not None or g.pools) else None
            generations.append(Generation(g.prompt_id, g.prompt_set, g.features,
                                          np.stack(cols, 1).astype(np.int16), work, g.pools))
        return TraceSet(actions, self.feature_spec, generations, self.target, self.head, self.temperature)

    def split(self, eval_fraction: float, seed: int = 0) -> tuple[TraceSet, TraceSet]:
        """Split by whole generations (positions of one text are correlated)."""
        order = np.random.default_rng(seed).permutation(len(self.generations))
        n_eval = max(1, int(round(eval_fraction * len(order)))) if len(order) > 1 else 0
        pick = lambda idx: TraceSet(self.actions, self.feature_spec,  # noqa: E731
                                    [self.generations[i] for i in sorted(idx)],
                                    self.target, self.head, self.temperature)
        return pick(order[n_eval:]), pick(order[:n_eval])


def _paths(stem: str | Path) -> tuple[Path, Path]:
    stem = Path(stem)
    if stem.suffix in (".json", ".safetensors"):
        stem = stem.with_suffix("")
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_traces(traces: TraceSet, stem: str | Path) -> tuple[Path, Path]:
    traces.validate()
    weights_path, meta_path = _paths(stem)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, g in enumerate(traces.generations):
        tensors[f"g{i}.features"] = np.ascontiguousarray(g.features)
        tensors[f"g{i}.accepted"] = np.ascontiguousarray(g.accepted)
        if g.work is not None:
            tensors[f"g{i}.work"] = np.stack([getattr(g.work, f) for f in WORK_FIELDS], -1).astype(np.int16)
        for j, pool in enumerate(g.pools):
            tensors[f"g{i}.pool{j}.scores"] = np.ascontiguousarray(pool.scores, dtype=np.float32)
            tensors[f"g{i}.pool{j}.matched"] = np.ascontiguousarray(pool.matched, dtype=np.uint8)
            tensors[f"g{i}.pool{j}.parents"] = np.ascontiguousarray(pool.parents, dtype=np.int16)
    save_file(tensors, str(weights_path))
    meta = {
        "format": "respsp-traces", "version": TRACE_FORMAT_VERSION,
        "actions": [a.to_dict() for a in traces.actions],
        "pools": [p.to_dict() for p in traces.pool_shapes],
        "feature_spec": [f.to_dict() for f in traces.feature_spec],
        "target": traces.target, "head": traces.head, "temperature": traces.temperature,
        "generations": [{"prompt_id": g.prompt_id, "prompt_set": g.prompt_set,
                         "positions": g.num_positions} for g in traces.generations],
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    return weights_path, meta_path


def load_traces(stem: str | Path) -> TraceSet:
    weights_path, meta_path = _paths(stem)
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise TraceError(f"{p}: no such trace file (a trace set is <stem>.json + <stem>.safetensors)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise TraceError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != "respsp-traces":
        raise TraceError(f"{meta_path}: not a respsp trace sidecar (format field missing)")
    if meta.get("version") != TRACE_FORMAT_VERSION:
        raise TraceError(f"{meta_path}: unknown trace format version {meta.get('version')!r}; "
                         f"this code reads version {TRACE_FORMAT_VERSION}")
    for key in ("actions", "feature_spec", "generations"):
        if not isinstance(meta.get(key), list):
            raise TraceError(f"{meta_path}: field {key!r} must be a list")
    try:
        actions = validate_actions(meta["actions"], "actions")
        pool_shapes = [TreeShape.from_dict(p, f"pools[{j}]") for j, p in enumerate(meta.get("pools") or [])]
        spec = [FeatureSpec(str(f["name"]), int(f["dim"])) for f in meta["feature_spec"]]
    except (ShapeError, KeyError, TypeError, ValueError) as e:
        raise TraceError(f"{meta_path}: bad actions, pools or feature_spec ({e})") from None
    try:
        tensors = load_file(str(weights_path))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise TraceError(f"{weights_path}: unreadable safetensors file ({e})") from None
    generations = []
    for i, g in enumerate(meta["generations"]):
        keys = (f"g{i}.features", f"g{i}.accepted")
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise TraceError(f"{weights_path}: tensors {missing} missing for generation {i}")
        work = tensors.get(f"g{i}.work")
        try:
            pools = [DraftPool(shape, tensors[f"g{i}.pool{j}.scores"], tensors[f"g{i}.pool{j}.matched"].astype(bool),
                               tensors[f"g{i}.pool{j}.parents"]) for j, shape in enumerate(pool_shapes)]
        except (KeyError, PoolError) as e:
            raise TraceError(f"{weights_path}: generation {i}: bad or missing pool tensors ({e})") from None
        gen = Generation(str(g.get("prompt_id")), str(g.get("prompt_set")), *(tensors[k] for k in keys),
                         None if work is None else StepWork(*np.moveaxis(work, -1, 0)), pools)
        if gen.num_positions != g.get("positions"):
            raise TraceError(f"{meta_path}: generation {i} says {g.get('positions')} positions, "
                             f"the tensors hold {gen.num_positions}")
        generations.append(gen)
    traces = TraceSet(actions, spec, generations, meta.get("target") or {}, meta.get("head") or {},
                      float(meta.get("temperature", math.nan)))
    return traces.validate(str(meta_path))


def synthetic_traces(actions: list[TreeShape], num_generations: int = 8, positions: int = 128,
                     hidden_size: int = 16, seed: int = 0, prompt_set: str = "synthetic") -> TraceSet:
    """Traces with known structure, for tests and for exercising training without a draft head.

    Each position has a latent difficulty d (a slowly varying AR(1) process, so both the
    features and the recent acceptance predict it). Level j of a tree is accepted when a
    uniform draw u_j (shared by all actions at that position: common random numbers) falls
    below 1 - (1 - q_j)^sqrt(w_j), where q_j = sigmoid(1 - d - 0.3 j) is the chance one
    candidate is right and w_j = min(K, T / j) is how many candidates the tree can afford at
    that level (sqrt: siblings are correlated, width has diminishing returns).
    A = the number of consecutive accepted levels, capped by D. So A is monotone in T, D and K,
    and large trees pay off only at easy positions, which is what a policy has to learn.
    """
    rng = np.random.default_rng(seed)
    actions = validate_actions(actions)
    max_depth = max(a.depth for a in actions)
    levels = np.arange(1, max_depth + 1, dtype=np.float64)
    total = np.array([a.total_tokens for a in actions], dtype=np.float64)
    top_k = np.array([a.top_k for a in actions], dtype=np.float64)
    depth = np.array([a.depth for a in actions])
    width = np.minimum(top_k[None, :], total[None, :] / levels[:, None])  # [levels, actions]
    direction = rng.standard_normal(3 * hidden_size).astype(np.float32)
    direction /= np.linalg.norm(direction)
    generations = []
    for g in range(num_generations):
        d = np.empty(positions)
        d[0] = rng.normal()
        for p in range(1, positions):
            d[p] = 0.9 * d[p - 1] + math.sqrt(1 - 0.81) * rng.normal()
        q = 1.0 / (1.0 + np.exp(-(1.0 - d[:, None] - 0.3 * levels[None, :])))  # [P, levels]
        p_level = 1.0 - (1.0 - q[:, :, None]) ** np.sqrt(width)[None, :, :]  # [P, levels, actions]
        u = rng.random((positions, max_depth))
        ok = u[:, :, None] < p_level
        ok &= levels[None, :, None] <= depth[None, None, :]  # levels below D are not drafted
        accepted = np.cumprod(ok, axis=1).sum(axis=1).astype(np.int16)
        noise = 0.5 * rng.standard_normal((positions, 3 * hidden_size))
        features = (d[:, None] * direction[None, :] * 4.0 + noise).astype(np.float32)
        generations.append(Generation(f"p{g}", prompt_set, features, accepted))
    return TraceSet(actions, [FeatureSpec("eagle3_fused", 3 * hidden_size)], generations,
                    target={"name": "synthetic", "hidden_size": hidden_size},
                    head={"name": "synthetic"}, temperature=0.0).validate()
