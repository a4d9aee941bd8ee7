"""Tree shapes: the (total_tokens, depth, top_k) triple a policy chooses per request and step.

Conventions (EAGLE-3's tree, design.md §3):
- `depth` is the number of draft levels below the root, i.e. the most draft tokens one step can
  accept. (EAGLE's own `depth` argument counts expansions after the root's, one less: EAGLE-3's
  default "depth 7" is `depth=8` here.)
- `top_k` is the beam width: level 1 is the root's top_k tokens; every further level expands
  each of the top_k frontier nodes into top_k children and keeps the best top_k as frontier.
- `total_tokens` is how many draft nodes (the root excluded) are verified: the best by
  cumulative draft log-probability among all candidates.

- `min_prob` (optional, 0 = off) makes the shape *confidence-bounded*: D becomes a cap. A
  frontier node is expanded only if its cumulative draft probability (the product of the
  draft's probabilities along its path, EAGLE-2's node score) is at least `min_prob`, so
  drafting stops at the first level where no node reaches it; verification still keeps the
  best `total_tokens` of the nodes drafted. The draft's own confidence, seen level by level
  while the tree grows, sets the depth: information a shape chosen before drafting cannot
  have. Why expansion only: a draft pass costs far more than verifying one more node (design.md
  §5), so the last level drafted is worth verifying even below the bound.
- `verify_min_prob` (optional, 0 = off) is the other bound: a draft node is verified only if
  its cumulative draft probability is at least `verify_min_prob` (nodes below it are neither
  verified nor expanded), so a shape may verify nothing at a step, its first draft included:
  the request then verifies only its bonus token, as with NO_DRAFTS, though its root pass ran.
  It is for machines where verifying a token costs a sizeable share of a step (a 2-core CPU at
  a few requests in flight): there a draft the head is unsure of costs more than it earns.

A beam can produce at most top_k + (depth - 1) * top_k**2 candidates; a shape asking for more
nodes than that, or for a tree shallower than its chain (total < depth), is impossible.
A chain of n tokens is (n, n, 1). `NO_DRAFTS` = (0, 0, 0) is the action that drafts nothing this
step: the request verifies only its bonus token. It is a policy action, not a static shape.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass


class ShapeError(ValueError):
    """A tree shape or action set that cannot be used; the message names the field."""


@dataclass(frozen=True, order=True)
class TreeShape:
    total_tokens: int
    depth: int
    top_k: int
    min_prob: float = 0.0
    verify_min_prob: float = 0.0

    @property
    def log_min_prob(self) -> float:
        """The node-score bound in log space (-inf when the shape is not confidence-bounded)."""
        return math.log(self.min_prob) if self.min_prob > 0 else -math.inf

    @property
    def log_verify_min_prob(self) -> float:
        """The verified nodes' score bound in log space (-inf: every drafted node may be verified)."""
        return math.log(self.verify_min_prob) if self.verify_min_prob > 0 else -math.inf

    @property
    def log_expand_min_prob(self) -> float:
        """The score a node needs to be expanded: a child never scores above its parent, so a
        node below either bound has no child worth verifying."""
        return max(self.log_min_prob, self.log_verify_min_prob)

    @property
    def bounded(self) -> bool:
        """Whether scores decide what is drafted (known only after drafting)."""
        return self.min_prob > 0 or self.verify_min_prob > 0

    @property
    def capacity(self) -> int:
        """Most candidate nodes a depth-`depth`, width-`top_k` beam produces."""
        return self.top_k + (self.depth - 1) * self.top_k**2

    @property
    def is_chain(self) -> bool:
        return self.top_k == 1

    @property
    def drafts(self) -> bool:
        return self.total_tokens > 0

    def validate(self, field: str = "shape", max_total_tokens: int | None = None) -> TreeShape:
        if self == NO_DRAFTS:
            return self
        for name in ("total_tokens", "depth", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ShapeError(f"{field}.{name} must be a positive integer, got {value!r}")
        if self.total_tokens > self.capacity:
            raise ShapeError(
                f"{field}.total_tokens={self.total_tokens} is more than a depth-{self.depth}, "
                f"top-{self.top_k} beam can produce; allowed: 1..{self.capacity} "
                f"(top_k + (depth-1) * top_k^2)")
        if self.total_tokens < self.depth:
            raise ShapeError(
                f"{field}.total_tokens={self.total_tokens} cannot fill depth={self.depth}; "
                f"allowed: total_tokens >= depth (lower depth instead)")
        if max_total_tokens is not None and self.total_tokens > max_total_tokens:
            raise ShapeError(
                f"{field}.total_tokens={self.total_tokens} exceeds the engine's per-request "
                f"token budget; allowed: 1..{max_total_tokens}")
        for name, off in (("min_prob", "expand every node to the shape's depth"),
                          ("verify_min_prob", "verify the best total_tokens nodes whatever their score")):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
                raise ShapeError(f"{field}.{name} must be a number in [0, 1) (0: {off}), got {value!r}")
        return self

    @classmethod
    def from_dict(cls, data: dict, field: str = "shape") -> TreeShape:
        if not isinstance(data, dict):
            raise ShapeError(f"{field} must be an object with total_tokens, depth, top_k; got {data!r}")
        keys = {"total_tokens", "depth", "top_k"}
        unknown = set(data) - keys - set(OPTIONAL_KEYS)
        missing = keys - set(data)
        if unknown or missing:
            raise ShapeError(f"{field} needs the keys {sorted(keys)} (and optionally "
                             f"{' and '.join(repr(k) for k in OPTIONAL_KEYS)}); "
                             f"unknown: {sorted(unknown)}, missing: {sorted(missing)}")
        return cls(data["total_tokens"], data["depth"], data["top_k"],
                   *(data.get(k, 0.0) for k in OPTIONAL_KEYS)).validate(field)

    @classmethod
    def parse(cls, text: str) -> TreeShape:
        """"T16/D5/K4" (as str() writes it), "chain5", "none" (NO_DRAFTS); either of the first
        two may end in "/p0.3" (min_prob), then "/v0.4" (verify_min_prob)."""
        if text.strip() in ("none", str(NO_DRAFTS)):
            return NO_DRAFTS
        m = re.fullmatch(r"(?:chain(\d+)|T(\d+)/D(\d+)/K(\d+))(?:/p(\d*\.?\d+))?(?:/v(\d*\.?\d+))?",
                         text.strip())
        if not m:
            raise ShapeError(f"shape {text!r}: expected chainN, T<total_tokens>/D<depth>/K<top_k> "
                             f"(either optionally ending in /p<min_prob> and /v<verify_min_prob>, "
                             f"e.g. T8/D8/K1/p0.3, chain1/v0.4) or none")
        bounds = [float(b) if b else 0.0 for b in (m[5], m[6])]
        if m[1]:
            return cls(int(m[1]), int(m[1]), 1, *bounds)
        return cls(int(m[2]), int(m[3]), int(m[4]), *bounds)

    def to_dict(self) -> dict:
        out = {"total_tokens": self.total_tokens, "depth": self.depth, "top_k": self.top_k}
        for key in OPTIONAL_KEYS:
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out

    def __str__(self) -> str:
        bounds = "".join(f"/{tag}{getattr(self, key):g}" for key, tag in zip(OPTIONAL_KEYS, "pv")
                         if getattr(self, key))
        return f"T{self.total_tokens}/D{self.depth}/K{self.top_k}{bounds}"


# the bounds, in the order of the fields and of the string form's /p and /v
OPTIONAL_KEYS = ("min_prob", "verify_min_prob")


def chain(n: int, min_prob: float = 0.0, verify_min_prob: float = 0.0) -> TreeShape:
    return TreeShape(n, n, 1, min_prob, verify_min_prob)


# Verify only the bonus token. The drafter's root pass still runs (it keeps the head's cache
# current and gives the policy its next state); where verifying drafts costs more than they
# return (large batches on a CPU), this is the action that wins.
NO_DRAFTS = TreeShape(0, 0, 0)


# respsp's default static shape: a modest tree (on the 2-core CPU testbed a step's cost grows
# quickly with verified tokens).
DEFAULT_SHAPE = TreeShape(16, 5, 4)

# EAGLE-3's defaults (total_token 60, depth 7, top_k 10) in this module's convention: EAGLE's
# total_token counts the root (the bonus token), T here does not; EAGLE's depth counts the
# expansions after the root's, D here counts every draft level.
EAGLE3_DEFAULT = TreeShape(59, 8, 10)


def resps_actions() -> list[TreeShape]:
    """Re-SpS's action set: total {32..128} x depth {3..8} x top_k {8..32}, feasible ones.

    Re-SpS counts depth like EAGLE (expansions after the root), so its depth d is d+1 levels
    here. It drops shapes with total_tokens > top_k ** (depth - 1), which leaves 177 actions.
    """
    actions = []
    for total in (32, 48, 64, 80, 96, 128):
        for eagle_depth in range(3, 9):
            for top_k in (8, 12, 16, 20, 32):
                if total <= top_k ** (eagle_depth - 1):
                    actions.append(TreeShape(total, eagle_depth + 1, top_k))
    return actions


def validate_actions(actions: Iterable, field: str = "actions",
                     max_total_tokens: int | None = None) -> list[TreeShape]:
    """Parse and check an action set: non-empty, each shape possible, no duplicates."""
    parsed = []
    for i, a in enumerate(actions):
        shape = a if isinstance(a, TreeShape) else TreeShape.from_dict(a, f"{field}[{i}]")
        parsed.append(shape.validate(f"{field}[{i}]", max_total_tokens))
    if not parsed:
        raise ShapeError(f"{field} must hold at least one shape")
    if len(set(parsed)) != len(parsed):
        raise ShapeError(f"{field} holds duplicate shapes")
    if not any(s.drafts for s in parsed):
        raise ShapeError(f"{field} must hold at least one shape that drafts (not only {NO_DRAFTS})")
    return parsed
