"""Is a speculative run's output the target's own? A verdict a user can read, in float32 and bf16.

In float32 the answer is token for token: any difference is a mismatch. In bf16 verifying
several tokens in one forward changes the rounding of the target's logits, so where two tokens
are (nearly) tied the argmax can flip and the texts part ways, with both continuations being the
target's greedy choice within its own precision. Each divergence is therefore checked against
the run without speculation: at the first differing position the target's raw logits (computed
without speculation, `top_logits`) must rank both tokens at the top, at most `BF16_STEPS` bf16
steps apart at the magnitude of the top logit (a bf16 step at magnitude m is 2^(floor(log2 m) - 7):
8 significant bits), counted at a magnitude of at least `STEP_FLOOR_MAGNITUDE`. Anything else is
a real mismatch, which the benchmarks and the demo report as MISMATCH and fail on.

The tolerance is what no speculation does to itself (`python -m benchmarks.bf16_noise`,
benchmarks/results/bf16-noise-20261205): the same MT-Bench context decoded in a batch of 80 and
alone, or prefilled, moves the margin between the top two tokens by 1 step in the median, 3 at
p99 and up to 7 steps where the top logit is 4 or more (0.44 logits at 9.5), and in 36 of 2834
contexts flips the argmax: 55 of 80 outputs without speculation change with the batch size. Below
a top logit of 8 the drift does not shrink with the logit (0.27 logits at 3.5: 17 of that
magnitude's steps; rounding follows the hidden state, not the logit), hence the floor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

BF16_STEPS = 8  # a near-tie: the two tokens' logits within 8 bf16 steps of each other
STEP_FLOOR_MAGNITUDE = 8.0  # steps are counted at the top logit's magnitude, or at 8 if it is smaller
BF16_NOISE_NOTE = ("no speculation against itself moves a top-2 margin by up to 7 such steps: "
                   "benchmarks/results/bf16-noise-20261205")
TOP_LOGITS = 5  # how many of the target's top tokens the check reads at a divergence


def bf16_step(magnitude: float) -> float:
    """The spacing of bf16 numbers at `magnitude` (8 significant bits)."""
    m = abs(magnitude)
    return 2.0 ** (math.floor(math.log2(m)) - 7) if m > 0 else 2.0 ** -133


@dataclass
class Divergence:
    prompt: int  # index in the batch
    position: int  # first output position where the tokens differ
    expected: int  # the token without speculation
    got: int  # the token with speculation
    gap: float | None = None  # |logit(expected) - logit(got)| without speculation
    tolerance: float | None = None
    near_tie: bool = False


@dataclass
class Verdict:
    prompts: int
    dtype: str
    divergences: list[Divergence] = field(default_factory=list)

    @property
    def mismatches(self) -> list[Divergence]:
        return [d for d in self.divergences if not d.near_tie]

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def label(self) -> str:
        if not self.divergences:
            return "identical"
        if self.ok:
            return f"equal up to {len(self.divergences)} near-tie{'s' if len(self.divergences) > 1 else ''}"
        return f"MISMATCH ({len(self.mismatches)} of {self.prompts} prompts)"

    def to_dict(self) -> dict:
        return {"label": self.label(), "ok": self.ok, "prompts": self.prompts, "dtype": self.dtype,
                "tolerance_bf16_steps": BF16_STEPS, "divergences": [dict(vars(d)) for d in self.divergences]}

    @classmethod
    def from_dict(cls, saved: dict) -> Verdict:
        """A stored verdict judged again with today's tolerance: the gaps it measured stay, the
        tolerance at each divergence is rescaled (it is a multiple of that point's bf16 step)."""
        divergences = []
        for d in saved["divergences"]:
            d = Divergence(**d)
            if d.gap is not None and d.tolerance is not None:
                step = d.tolerance / saved["tolerance_bf16_steps"]  # the step at that top logit
                d.tolerance = BF16_STEPS * max(step, bf16_step(STEP_FLOOR_MAGNITUDE))
                d.near_tie = d.gap <= d.tolerance
            divergences.append(d)
        return cls(saved["prompts"], saved["dtype"], divergences)


def first_divergences(reference: list[list[int]], candidate: list[list[int]]) -> list[Divergence]:
    out = []
    for i, (ref, got) in enumerate(zip(reference, candidate)):
        if ref == got:
            continue
        pos = next((p for p, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        expected = ref[pos] if pos < len(ref) else -1  # -1: one output ended (EOS) where the other went on
        out.append(Divergence(i, pos, expected, got[pos] if pos < len(got) else -1))
    return out


def is_near_tie(top: dict[int, float], d: Divergence) -> tuple[bool, float | None, float | None]:
    """(near tie?, gap, tolerance) from the target's top raw logits at the divergence."""
    if d.expected not in top or d.got not in top:
        return False, None, None
    gap = abs(top[d.expected] - top[d.got])
    tolerance = tolerance_at(max(abs(v) for v in top.values()))
    return gap <= tolerance, gap, tolerance


def tolerance_at(top_logit: float) -> float:
    """The near-tie tolerance where the target's top logit is `top_logit`."""
    return BF16_STEPS * bf16_step(max(abs(top_logit), STEP_FLOOR_MAGNITUDE))


def judge(reference: list[list[int]], candidate: list[list[int]], prompts: list[list[int]], dtype: str,
          top_logits: Callable[[list[list[int]]], list[dict[int, float]]] | None) -> Verdict:
    """The verdict on `candidate` against `reference` (no speculation), for prompt token ids
    `prompts`. `top_logits(contexts)` gives the target's top raw logits {token: logit} after each
    context, without speculation (only called in bf16, only where outputs differ)."""
    verdict = Verdict(len(reference), dtype, first_divergences(reference, candidate))
    if not verdict.divergences or dtype in ("float32", "torch.float32") or top_logits is None:
        return verdict
    checkable = [d for d in verdict.divergences if d.expected >= 0 and d.got >= 0]
    tops = top_logits([prompts[d.prompt] + reference[d.prompt][:d.position] for d in checkable])
    for d, top in zip(checkable, tops):
        d.near_tie, d.gap, d.tolerance = is_near_tie(top, d)
    return verdict
