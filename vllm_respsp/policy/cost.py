"""Hardware cost model: seconds of one engine step for a tree shape, a batch load and a context.

    t(shape, batch, context) = Σ_term coefficient[term] * basis[term](shape, batch, context)

The basis splits a speculative step into what design.md §5 measured separately: the plain
forward's fixed cost, the fixed speculation overhead, one draft pass per tree level, draft-head
rows, and the verification forward over q = total_tokens + 1 tokens per sequence (the root, i.e.
the bonus token, plus the draft nodes). Drafting is counted: Re-SpS's reward did not, so depth
and width looked free to its policy (design.md §2).

The model is linear in its coefficients, so it is fitted by least squares from a *profile*: a
JSON list of measured rows. A profile names the terms it can identify; a term its rows do not
vary (e.g. context, when every row used a 256-token prefix) must be left out of `terms`, not
guessed. Steps are modelled for a homogeneous batch (every request uses the same shape); see
`request_seconds` for how a request's share is derived.

Profile file:
    {"name": "...", "source": "where the numbers come from", "hardware": "...",
     "default_context": 256, "terms": ["step", ...],
     "rows": [{"shape": {"total_tokens": T, "depth": D, "top_k": K} | "q_tokens": q,
               "batch": B, "context": C, "seconds": s, "held": false, "note": "..."}, ...]}
A row with "q_tokens" is a plain forward over q new tokens per sequence (no drafting); a row
with "shape" is a whole speculative step with that tree. A NO_DRAFTS row with "held": true was
timed with the choice held for the whole run (no root pass: `StepWork.held`); without it, the
root pass ran every step (a policy deciding every step, or the runtime before deferral).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vllm_respsp.tree.shape import NO_DRAFTS, ShapeError, TreeShape

PROFILE_DIR = Path(__file__).parent / "profiles"


@dataclass(frozen=True)
class StepWork:
    """What one request does in a step; every field a number or equally shaped arrays.

    speculates  1 when the request runs the drafter at all (0: no speculation)
    levels      draft-head passes: tree levels grown, the root's included (NO_DRAFTS: 1, the
                root that gives the policy its features; held for long: 0, see `held`)
    rows        draft-head rows: the root's, then the expanded frontier nodes of each level
    nodes       draft nodes verified (the target forward runs nodes + 1 tokens: the bonus too)
    tree        1 when the verified nodes are a real tree, not a chain (tree-attention terms)

    A static shape's work is fixed (`of`); a confidence-bounded shape's depends on the draft's
    scores at each position, and `policy.pools` derives it from recorded beams.
    """

    speculates: float | np.ndarray
    levels: float | np.ndarray
    rows: float | np.ndarray
    nodes: float | np.ndarray
    tree: float | np.ndarray

    @classmethod
    def of(cls, shape: TreeShape | None, q_tokens: int | None = None) -> StepWork:
        """The nominal work of a shape (a bounded shape: its caps); None: a plain forward."""
        if shape is None:
            return cls(0, 0, 0, (q_tokens or 1) - 1, 0)
        levels = max(shape.depth, 1)  # NO_DRAFTS still runs the root's pass
        return cls(1, levels, 1 + (levels - 1) * shape.top_k, shape.total_tokens,
                   int(shape.top_k > 1 and shape.total_tokens > shape.depth))

    @classmethod
    def held(cls) -> StepWork:
        """A step of a request held on NO_DRAFTS for long (a load above the policy's
        `max_draft_load`, the profile's constant policy): no root pass, no speculation setup,
        and its row never runs through the head (past the drafter's DEFER_WINDOW deferred rows
        are dropped), so it is a plain step's work."""
        return cls.of(None)


# name -> basis value for (work w, batch b, context c); w's fields may be arrays
TERMS = {
    "step": lambda w, b, c: np.ones_like(np.asarray(w.nodes, dtype=float)),  # weights read once per forward
    "speculation": lambda w, b, c: w.speculates,  # draft setup, tree metadata
    # one head call per level; the root's runs even for NO_DRAFTS (it extends the head's cache)
    "draft_pass": lambda w, b, c: w.levels,
    "draft_rows": lambda w, b, c: b * w.rows,  # rows the draft head computes
    "verify_tokens": lambda w, b, c: b * (w.nodes + 1),  # target forward over all sequences' tokens
    "sequences": lambda w, b, c: b + 0 * w.nodes,  # per-sequence bookkeeping (sampling, metadata)
    "attention": lambda w, b, c: b * (w.nodes + 1) * c,  # token x context pairs in attention
    # Where a backend has no tree attention of its own (vLLM's CPU one is causal only), the
    # rows of a non-chain tree are attended again through their masks and their KV compacted
    # after verification: a cost per step with trees (the plan, per layer), per tree request
    # and per tree row, that chains never pay.
    "tree_step": lambda w, b, c: w.tree,
    "tree_requests": lambda w, b, c: b * w.tree,
    "tree_rows": lambda w, b, c: b * (w.nodes + 1) * w.tree,
}


# Paid once per step, whatever the batch holds: the weights' read, the draft setup, one head
# pass per level of the *deepest* tree, the tree plan. In a batch of different shapes these take
# the batch's largest value; the other terms add up over its requests.
SHARED_TERMS = frozenset({"step", "speculation", "draft_pass", "tree_step"})


class ProfileError(ValueError):
    """A cost profile that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class ProfileRow:
    shape: TreeShape | None
    q_tokens: int  # tokens per sequence in the target forward
    batch: int
    context: int
    seconds: float
    held: bool = False  # a NO_DRAFTS row timed with the choice held (no root pass): StepWork.held

    @property
    def work(self) -> StepWork:
        return StepWork.held() if self.held else StepWork.of(self.shape, self.q_tokens)


@dataclass(frozen=True)
class CostProfile:
    name: str
    source: str
    terms: tuple[str, ...]
    rows: tuple[ProfileRow, ...]
    default_context: int
    digest: str  # sha256 (16 hex) of the file's content: policy files record which profile they used


def profile_path(name_or_path: str | Path) -> Path:
    """A shipped profile by name ("cpu-smollm2-135m") or any profile file path."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = PROFILE_DIR / f"{name_or_path}.json"
    if shipped.is_file():
        return shipped
    raise ProfileError(f"profile {str(name_or_path)!r}: no such file and no shipped profile of that "
                       f"name; shipped: {sorted(q.stem for q in PROFILE_DIR.glob('*.json'))}")


def load_profile(name_or_path: str | Path) -> CostProfile:
    path = profile_path(name_or_path)
    text = path.read_text()
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise ProfileError(f"{path}: not valid JSON ({e})") from None
    return parse_profile(raw, str(path))


def parse_profile(raw: dict, where: str = "profile") -> CostProfile:
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: a profile must be a JSON object")
    for key in ("name", "source", "terms", "rows"):
        if key not in raw:
            raise ProfileError(f"{where}: field {key!r} is required")
    terms = raw["terms"]
    unknown = [t for t in terms if t not in TERMS] if isinstance(terms, list) else terms
    if not isinstance(terms, list) or not terms or unknown:
        raise ProfileError(f"{where}: terms must be a non-empty list drawn from {sorted(TERMS)}; "
                           f"unknown: {unknown}")
    default_context = int(raw.get("default_context", 0))
    rows = []
    for i, r in enumerate(raw["rows"]):
        tag = f"{where}: rows[{i}]"
        if not isinstance(r, dict) or ("shape" in r) == ("q_tokens" in r):
            raise ProfileError(f"{tag} needs exactly one of 'shape' or 'q_tokens'")
        try:
            shape = TreeShape.from_dict(r["shape"], f"{tag}.shape") if "shape" in r else None
        except ShapeError as e:
            raise ProfileError(str(e)) from None
        q = shape.total_tokens + 1 if shape else r["q_tokens"]
        batch, seconds = r.get("batch"), r.get("seconds")
        context = r.get("context", default_context)
        if not all(isinstance(v, int) and v >= 1 for v in (q, batch)):
            raise ProfileError(f"{tag}: q_tokens and batch must be positive integers")
        if not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ProfileError(f"{tag}: seconds must be a positive number, got {seconds!r}")
        held = r.get("held", False)
        if held not in (True, False) or (held and shape != NO_DRAFTS):
            raise ProfileError(f"{tag}: held must be true or false, and true only for NO_DRAFTS, got {held!r}")
        rows.append(ProfileRow(shape, q, batch, int(context), float(seconds), held))
    if len(rows) < len(terms):
        raise ProfileError(f"{where}: {len(rows)} rows cannot fit {len(terms)} terms")
    canonical = json.dumps({k: raw[k] for k in ("name", "terms", "rows")}, sort_keys=True)
    return CostProfile(str(raw["name"]), str(raw["source"]), tuple(terms), tuple(rows),
                       default_context, hashlib.sha256(canonical.encode()).hexdigest()[:16])


def basis(terms: tuple[str, ...], shape: TreeShape | None, batch: int, context: int,
          q_tokens: int | None = None) -> np.ndarray:
    return work_basis(terms, StepWork.of(shape, q_tokens), batch, context)


def work_basis(terms: tuple[str, ...], work: StepWork, batch: int, context: int) -> np.ndarray:
    """[..., len(terms)]: the basis of every term for `work` (scalar or array fields)."""
    cols = [np.asarray(TERMS[t](work, batch, context), dtype=float) for t in terms]
    return np.stack(np.broadcast_arrays(*cols), axis=-1)


@dataclass(frozen=True)
class CostModel:
    terms: tuple[str, ...]
    coefficients: np.ndarray  # seconds per unit of each term
    default_context: int = 0
    profile_name: str = ""
    profile_digest: str = ""

    def step_seconds(self, shape: TreeShape | None, batch: int = 1, context: int | None = None) -> float:
        """One engine step of `batch` requests all using `shape` (None: no speculation)."""
        ctx = self.default_context if context is None else context
        return float(basis(self.terms, shape, batch, ctx) @ self.coefficients)

    def request_seconds(self, shape: TreeShape | None, batch: int = 1, context: int | None = None) -> float:
        """A request's share of a step: step / batch.

        Under a cost linear in per-request terms, step = fixed + Σ_i own(shape_i), and this
        share is fixed/batch + own(shape); maximizing batch tokens/s then splits into one
        problem per request (see simulator.py). Terms shared by the batch (draft passes: the
        deepest tree sets their number) make this a homogeneous-batch approximation.
        """
        return self.step_seconds(shape, batch, context) / batch

    def action_costs(self, actions: list[TreeShape], batch: int = 1, context: int | None = None) -> np.ndarray:
        return np.array([self.request_seconds(a, batch, context) for a in actions])

    def work_seconds(self, work: StepWork, batch: int = 1, context: int | None = None) -> np.ndarray:
        """A request's share of a step (as `request_seconds`) for work of any array shape."""
        ctx = self.default_context if context is None else context
        return work_basis(self.terms, work, batch, ctx) @ self.coefficients / batch

    def batch_step_seconds(self, work: StepWork, context: int | None = None) -> float:
        """One step of a batch whose requests do different work (fields: arrays [B]).

        Shared terms (SHARED_TERMS) count the batch's largest value, the rest add up; for a
        batch of one shape this equals step_seconds(shape, B)."""
        ctx = self.default_context if context is None else context
        cols = work_basis(self.terms, work, 1, ctx).reshape(-1, len(self.terms))
        shared = np.array([t in SHARED_TERMS for t in self.terms])
        return float(np.where(shared, cols.max(axis=0), cols.sum(axis=0)) @ self.coefficients)

    def describe(self) -> str:
        return ", ".join(f"{t}={c * 1e3:.3g} ms" for t, c in zip(self.terms, self.coefficients))


def fit(profile: CostProfile) -> CostModel:
    """Least squares on relative error (rows of 25 ms and 120 ms count alike), coefficients >= 0.

    Non-negativity by a small active-set loop: a term that fits negative (noise, or a term the
    rows barely vary) is pinned at 0 and the rest refitted; a cost never decreases with work.
    """
    X = np.stack([work_basis(profile.terms, r.work, r.batch, r.context) for r in profile.rows])
    y = np.array([r.seconds for r in profile.rows])
    w = 1.0 / y
    active = np.ones(len(profile.terms), dtype=bool)
    coef = np.zeros(len(profile.terms))
    while active.any():
        sol, *_ = np.linalg.lstsq(X[:, active] * w[:, None], y * w, rcond=None)
        coef[:] = 0.0
        coef[active] = sol
        if (sol >= 0).all():
            break
        active[np.flatnonzero(active)[sol < 0]] = False
    return CostModel(profile.terms, coef, profile.default_context, profile.name, profile.digest)


def load_cost_model(name_or_path: str | Path) -> CostModel:
    return fit(load_profile(name_or_path))
