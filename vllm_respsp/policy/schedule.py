"""The measured schedule: at each batch load, the drafting mode this engine runs fastest,
measured on its own steps.

A shape policy is trained in a simulator whose costs were measured on one machine with one
prompt set, and its load gate (`max_draft_load`) on another. Which drafting pays still moves
with the prompts and the load: at batch 4 on the project's CPU, vLLM's chain of one draft is 8%
faster than no speculation on MT-Bench and 5% slower on HumanEval, and the policy's own step
loses to both somewhere (benchmarks/results/throughput-20261206f); at batch 1 a chain of two
beats the policy on MT-Bench (throughput-20261206a). So at every load where the gate lets the
policy draft, the runtime keeps measuring the tokens per second it gets in each mode and runs
the best:

- `POLICY`: the policy's own shapes;
- `chain1`, `chain2`, `chain3`: a chain of that many drafts for every request, what vLLM's
  EAGLE-3 and its K-by-batch-size schedule would run (up to the engine's draft budget);
- `NO_DRAFTS`: nothing drafts, a step as cheap as one without speculation.

Per load bucket (1, 2, 3-4, 5-8, ...) the schedule runs windows of steps in one mode: first
`min_samples` measured steps of every mode, then the best mode in windows of `exploit_steps`,
probing each other mode for `probe_steps` once it has waited `reprobe_steps` (longer the further
behind it was measured, so a mode that loses by much is rarely paid for again). A step is
measured for a mode only if it and the step before it ran in that mode at the same load with
no prefill: a step verifies the previous step's drafts and drafts its own, so the first step
after a switch belongs to neither mode.

Plain Python: the runtime gives it each step's load, mode, emitted tokens and end time. Its
choices depend on wall time, so it runs only where one process decides alone (tensor-parallel
size 1: ranks measuring different times would lay out different trees).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from vllm_respsp.tree.shape import NO_DRAFTS as NO_DRAFTS_SHAPE
from vllm_respsp.tree.shape import TreeShape, chain

POLICY = "policy"
NO_DRAFTS = "no_drafts"
CHAIN_LENGTHS = (1, 2, 3)  # longer chains lose on every load and prompt set measured here


def chain_mode(drafts: int) -> str:
    return f"chain{drafts}"


def modes_within(budget: int) -> tuple[str, ...]:
    """Every mode whose step fits a draft budget of this many tokens per request, in the order
    a new bucket measures them."""
    return (POLICY, *(chain_mode(k) for k in CHAIN_LENGTHS if k <= budget), NO_DRAFTS)


def mode_shape(mode: str) -> TreeShape | None:
    """The shape every request drafts in this mode (None: the policy's own shapes)."""
    if mode == POLICY:
        return None
    return NO_DRAFTS_SHAPE if mode == NO_DRAFTS else chain(int(mode.removeprefix("chain")))


@dataclass(frozen=True)
class ScheduleSettings:
    probe_steps: int = 8  # a window in a mode being measured (its first step is not: the switch)
    exploit_steps: int = 16  # a window in the best mode
    min_samples: int = 6  # measured steps of each mode before the best one is trusted
    # measured steps kept per (bucket, mode): a probe's 7 replace most of a mode's old figure,
    # so a mode measured long ago is judged on today's traffic, as the running mode is
    memory: int = 12
    reprobe_steps: int = 128  # steps before a mode measured 5% behind is measured again
    max_reprobe_steps: int = 2048


def load_bucket(load: int) -> int:
    """The bucket a batch load is measured in: the next power of two (1, 2, 4, 8, ...)."""
    return 1 << max(0, math.ceil(math.log2(max(1, load))))


@dataclass
class _Bucket:
    modes: tuple[str, ...]
    samples: dict[str, deque] = field(default_factory=dict)  # mode -> (tokens, seconds) per step
    mode: str = POLICY
    left: int = 0  # steps left in the current window
    waited: dict[str, int] = field(default_factory=dict)  # mode -> steps since it last ran

    def measured(self, mode: str) -> int:
        return len(self.samples.get(mode, ()))

    def rate(self, mode: str) -> float:
        """Emitted tokens per second over the mode's kept steps (0 when never measured)."""
        kept = self.samples.get(mode, ())
        seconds = sum(s for _, s in kept)
        return sum(t for t, _ in kept) / seconds if seconds > 0 else 0.0


class MeasuredSchedule:
    def __init__(self, modes: tuple[str, ...] = modes_within(max(CHAIN_LENGTHS)),
                 settings: ScheduleSettings | None = None):
        self.modes = tuple(modes)
        self.settings = settings or ScheduleSettings()
        self.buckets: dict[int, _Bucket] = {}
        self.steps: dict[str, int] = {m: 0 for m in self.modes}
        self._last: tuple[int, str, float] | None = None  # (bucket, mode, end time) of the last step

    def _bucket(self, load: int) -> _Bucket:
        return self.buckets.setdefault(load_bucket(load), _Bucket(self.modes))

    def mode(self, load: int) -> str:
        """This step's mode at this load (advances the bucket's window by one step)."""
        bucket = self._bucket(load)
        if bucket.left <= 0:
            bucket.mode, bucket.left = self._next_window(bucket)
        bucket.left -= 1
        for m in self.modes:
            bucket.waited[m] = 0 if m == bucket.mode else bucket.waited.get(m, 0) + 1
        self.steps[bucket.mode] += 1
        return bucket.mode

    def _next_window(self, bucket: _Bucket) -> tuple[str, int]:
        s = self.settings
        for m in self.modes:
            if bucket.measured(m) < s.min_samples:
                return m, s.probe_steps
        rates = {m: bucket.rate(m) for m in self.modes}
        best = max(self.modes, key=rates.get)
        # the mode that has waited longest past its turn first
        due = [(bucket.waited.get(m, 0) - self._reprobe_after(rates[m], rates[best]), m)
               for m in self.modes if m != best]
        overdue, m = max(due, default=(-1, best))
        return (m, s.probe_steps) if overdue >= 0 else (best, s.exploit_steps)

    def _reprobe_after(self, rate: float, best: float) -> int:
        s = self.settings
        behind = 1.0 - rate / best if best > 0 else 1.0
        return min(s.max_reprobe_steps, int(s.reprobe_steps * max(1.0, behind / 0.05)))

    def step_done(self, load: int, mode: str | None, tokens: int, decode_only: bool, now: float) -> None:
        """A step ended at `now` (seconds, monotonic) after emitting `tokens` at this load in this
        mode (None: the schedule did not choose it, e.g. above the load gate)."""
        bucket = load_bucket(load)
        last, self._last = self._last, (bucket, mode, now) if mode is not None else None
        if mode is None or last is None or not decode_only or last[:2] != (bucket, mode):
            return
        seconds = now - last[2]
        if seconds > 0:
            samples = self._bucket(load).samples
            samples.setdefault(mode, deque(maxlen=self.settings.memory)).append((tokens, seconds))

    def report(self) -> dict:
        """For the stats file: steps per mode, and per bucket the mode now run and each rate."""
        return {"steps": dict(self.steps),
                "buckets": {str(b): {"mode": st.mode,
                                     "tokens_per_s": {m: round(st.rate(m), 1) for m in self.modes if st.measured(m)}}
                            for b, st in sorted(self.buckets.items())}}
