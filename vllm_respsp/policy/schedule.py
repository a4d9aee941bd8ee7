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

Per load (1, 2, ... 8, then buckets 9-16, 17-32, ...) the schedule runs windows of steps in one
mode: at the first load it sees, `min_samples` measured steps of every mode; at a later load,
the best mode of the nearest load measured, the others in their turn; then the best mode in
windows of `exploit_steps`, probing each other mode for `probe_steps` once it has waited
`reprobe_steps` (longer the further behind it was measured, once it has run `settled_steps`
there). A step is measured for a mode only if it and the step before it ran in that mode at
the same load with no prefill (a step verifies the previous step's drafts and drafts its own,
so the first step after a switch belongs to neither mode), and not among the mode's first
`warm_steps` at that load. A mode's rate at a load is its tokens per step over its median step
time there. Step times are steady, so a few steps price a mode at a load; what a step emits is
not (one request's run of easy tokens moves a step of four by a quarter), so it is pooled:
per-position acceptance of every chain verified at any load (`ChainAcceptance`), tokens per
request of the policy's recent steps at the load (it drafts deeper at lower loads).

Opt-in (`"schedule": "measured"`): on the project's CPU it did not beat the policy alone
(benchmarks/results/throughput-20261206i). A few steps per mode are noisy on a shared 2-core
machine, and in a batch run to its end, drafting moves work to the batch's low-load tail, which
figures per step cannot see.

Plain Python: the runtime gives it each step's load, mode, emitted tokens and end time. Its
choices depend on wall time, so it runs only where one process decides alone (tensor-parallel
size 1: ranks measuring different times would lay out different trees).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from vllm_respsp.tree.shape import NO_DRAFTS as NO_DRAFTS_SHAPE
from vllm_respsp.tree.shape import TreeShape, chain

POLICY = "policy"
NO_DRAFTS = "no_drafts"
CHAIN_LENGTHS = (1, 2, 3)  # longer chains lose on every load and prompt set measured here


def chain_mode(drafts: int) -> str:
    return f"chain{drafts}"


def chain_length(mode: str | None) -> int | None:
    """The drafts of a chain mode (None: not a chain mode)."""
    return int(mode.removeprefix("chain")) if mode is not None and mode.startswith("chain") else None


def modes_within(budget: int) -> tuple[str, ...]:
    """Every mode whose step fits a draft budget of this many tokens per request, in the order
    a new bucket measures them."""
    return (POLICY, *(chain_mode(k) for k in CHAIN_LENGTHS if k <= budget), NO_DRAFTS)


def mode_shape(mode: str) -> TreeShape | None:
    """The shape every request drafts in this mode (None: the policy's own shapes)."""
    if mode == POLICY:
        return None
    return NO_DRAFTS_SHAPE if mode == NO_DRAFTS else chain(chain_length(mode))


@dataclass(frozen=True)
class ScheduleSettings:
    # A load's steps of one mode take a steady time (but for rare stalls, see `_Bucket.rate`),
    # so a few measured steps price a mode at a load; what a step emits is pooled over loads.
    probe_steps: int = 4  # a window in a mode being measured (its first step is not: the switch)
    exploit_steps: int = 16  # a window in the best mode
    min_samples: int = 3  # measured steps of each mode at a load before the best one is trusted
    # measured steps kept per (load, mode): a probe's 3 replace much of a mode's old figure, so a
    # mode measured long ago (shorter contexts, other prompts) is judged on today's traffic
    memory: int = 8
    # The first decode steps of a mode at a load are not measured: they run shapes the CPU's
    # kernels have not seen (oneDNN builds its primitives per shape), up to 20% slower, and a
    # mode priced on them would lose its turn for long.
    warm_steps: int = 4
    # Shapes keep being new for a while (a chain of 2 verifies 1-3 tokens and extends the head
    # by as many): until a mode has run this many decode steps at a load it is measured again
    # every `reprobe_steps`, however far behind its first steps put it (a chain of 2 measured
    # 26.6 tokens/s in its first window at batch 1, where it runs at ~40).
    settled_steps: int = 32
    reprobe_steps: int = 256  # steps before a mode measured 5% behind is measured again
    # at most: a figure taken in a slow patch still gets measured again within a few batches
    max_reprobe_steps: int = 1024


class DecayedMean:
    """A mean over the last ~`memory` observations, older ones weighing less."""

    def __init__(self, memory: int):
        self.decay = 1.0 - 1.0 / memory
        self.total = self.weight = 0.0

    def add(self, value: float, weight: float = 1.0) -> None:
        self.total = self.total * self.decay + value * weight
        self.weight = self.weight * self.decay + weight

    def value(self, min_weight: float) -> float | None:
        return self.total / self.weight if self.weight >= min_weight else None


EXACT_LOADS = 8  # each load up to this one is measured on its own: a step of 3 requests is
# not a step of 4, and a bucket mixing them would judge modes on different mixes


def load_bucket(load: int) -> int:
    """The bucket a batch load is measured in: the load itself up to EXACT_LOADS, then the next
    power of two (16, 32, ...)."""
    load = max(1, load)
    return load if load <= EXACT_LOADS else 1 << math.ceil(math.log2(load))


class ChainAcceptance:
    """How often a chain's j-th draft is accepted once the ones before it were, pooled over
    every request of every chain step at every load, with decaying counts that follow the
    prompts. A chain step's emitted tokens then come from these rates, not from the step's own
    count: a dozen steps of 4 requests says little (one request's run of easy tokens moves
    it by a quarter), thousands of drafts say much, and every chain mode's steps inform the
    others'."""

    MIN_TRIED = 8.0  # decayed trials of a position before its rate is used

    def __init__(self, depth: int = max(CHAIN_LENGTHS), memory: int = 512):
        self.tried = [0.0] * depth
        self.passed = [0.0] * depth
        self.decay = 1.0 - 1.0 / memory

    def observe(self, drafts: int, accepted: int) -> None:
        """One request verified a chain of `drafts` and accepted its first `accepted`."""
        for j in range(len(self.tried)):
            self.tried[j] *= self.decay
            self.passed[j] *= self.decay
            if j < drafts and j <= accepted:  # draft j was reached
                self.tried[j] += 1.0
                self.passed[j] += float(j < accepted)

    def tokens_per_request(self, drafts: int) -> float | None:
        """Expected tokens a request emits verifying a chain of `drafts` (None: too few seen)."""
        total = reach = 1.0
        for j in range(drafts):
            if j >= len(self.tried) or self.tried[j] < self.MIN_TRIED:
                return None
            reach *= self.passed[j] / self.tried[j]
            total += reach
        return total


@dataclass
class _Bucket:
    modes: tuple[str, ...]
    samples: dict[str, deque] = field(default_factory=dict)  # mode -> (tokens, seconds, load) per step
    mode: str = POLICY
    left: int = 0  # steps left in the current window
    waited: dict[str, int] = field(default_factory=dict)  # mode -> steps since it last ran
    decoded: dict[str, int] = field(default_factory=dict)  # mode -> decode steps seen (warm-up)
    # tokens per request of the policy's steps at this load (it drafts deeper at lower loads),
    # over more steps than the step times: its shapes vary, so no per-position model
    policy_yield: DecayedMean = field(default_factory=lambda: DecayedMean(memory=64))

    def measured(self, mode: str) -> int:
        return len(self.samples.get(mode, ()))

    def rate(self, mode: str, per_request: float | None) -> float:
        """Emitted tokens per second in this mode at this load: `per_request` tokens (pooled
        over loads; None: this load's own steps' mean) for each request of its kept steps, over
        their median time, not the mean: a garbage collection or a log line stalls one step in
        many, and a mean would charge it to whichever mode ran then. 0 when never measured."""
        kept = self.samples.get(mode, ())
        if not kept:
            return 0.0
        tokens = statistics.fmean(t if per_request is None else n * per_request for t, _, n in kept)
        return tokens / statistics.median(s for _, s, _ in kept)


class MeasuredSchedule:
    def __init__(self, modes: tuple[str, ...] = modes_within(max(CHAIN_LENGTHS)),
                 settings: ScheduleSettings | None = None):
        self.modes = tuple(modes)
        self.settings = settings or ScheduleSettings()
        self.buckets: dict[int, _Bucket] = {}
        self.acceptance = ChainAcceptance()
        self.steps: dict[str, int] = {m: 0 for m in self.modes}
        self._last: tuple[int, str, float] | None = None  # (bucket, mode, end time) of the last step

    def _bucket(self, load: int) -> _Bucket:
        return self.buckets.setdefault(load_bucket(load), _Bucket(self.modes))

    def mode(self, load: int) -> str:
        """This step's mode at this load (advances the bucket's window by one step)."""
        bucket = self._bucket(load)
        if bucket.left <= 0:
            bucket.mode, bucket.left = self._next_window(load_bucket(load))
        bucket.left -= 1
        for m in self.modes:
            bucket.waited[m] = 0 if m == bucket.mode else bucket.waited.get(m, 0) + 1
        self.steps[bucket.mode] += 1
        return bucket.mode

    def _next_window(self, key: int) -> tuple[str, int]:
        s, bucket = self.settings, self.buckets[key]
        rates = {m: bucket.rate(m, self.tokens_per_request(m, key)) for m in self.modes
                 if bucket.measured(m) >= s.min_samples}
        if len(rates) < len(self.modes):
            donor = self._nearest_measured(key)
            if donor is None:  # the first load seen: measure every mode in turn
                return next(m for m in self.modes if m not in rates), s.probe_steps
            if not rates:  # a load seen rarely (a batch's tail): start with a nearby load's best
                return self._best(donor), s.exploit_steps
            # the rest wait their turn, as if measured a little behind (measuring every mode at
            # every load a batch drains through would cost more than it finds)
            rates |= {m: 0.95 * max(rates.values()) for m in self.modes if m not in rates}
        best = max(self.modes, key=rates.get)
        # the mode that has waited longest past its turn first
        due = [(bucket.waited.get(m, 0) - self._reprobe_after(rates[m], rates[best], bucket.decoded.get(m, 0)), m)
               for m in self.modes if m != best]
        overdue, m = max(due, default=(-1, best))
        return (m, s.probe_steps) if overdue >= 0 else (best, s.exploit_steps)

    def _nearest_measured(self, key: int) -> int | None:
        """The nearest other load at which every mode has been measured."""
        done = [k for k, b in self.buckets.items()
                if k != key and all(b.measured(m) >= self.settings.min_samples for m in self.modes)]
        return min(done, key=lambda k: (abs(math.log2(k) - math.log2(key)), k), default=None)

    def _best(self, key: int) -> str:
        return max(self.modes, key=lambda m: self.rate(key, m))

    def rate(self, load: int, mode: str) -> float:
        """Tokens per second this mode is measured to emit at this load (0: never measured)."""
        return self._bucket(load).rate(mode, self.tokens_per_request(mode, load))

    def tokens_per_request(self, mode: str, load: int) -> float | None:
        """What a request emits per step in this mode at this load: chains pooled over loads
        (None: not known yet)."""
        if mode == NO_DRAFTS:
            return 1.0
        if mode == POLICY:
            return self._bucket(load).policy_yield.value(min_weight=ChainAcceptance.MIN_TRIED)
        return self.acceptance.tokens_per_request(chain_length(mode))

    def _reprobe_after(self, rate: float, best: float, decoded: int) -> int:
        s = self.settings
        if decoded < s.settled_steps:  # too new at this load to be judged far behind
            return s.reprobe_steps
        behind = 1.0 - rate / best if best > 0 else 1.0
        return min(s.max_reprobe_steps, int(s.reprobe_steps * max(1.0, behind / 0.05)))

    def step_done(self, load: int, mode: str | None, tokens: int, decode_only: bool, now: float) -> None:
        """A step ended at `now` (seconds, monotonic) after emitting `tokens` at this load in this
        mode (None: the schedule did not choose it, e.g. above the load gate)."""
        bucket = load_bucket(load)
        last, self._last = self._last, (bucket, mode, now) if mode is not None else None
        if mode is None or last is None or not decode_only or last[:2] != (bucket, mode):
            return
        seconds, state = now - last[2], self._bucket(load)
        state.decoded[mode] = state.decoded.get(mode, 0) + 1
        if seconds > 0 and state.decoded[mode] > self.settings.warm_steps:
            state.samples.setdefault(mode, deque(maxlen=self.settings.memory)).append((tokens, seconds, load))
            if mode == POLICY:
                state.policy_yield.add(tokens / load, load)

    def verified_chain(self, drafts: int, accepted: int) -> None:
        """A request verified a chain this schedule's mode drafted (`ChainAcceptance.observe`)."""
        self.acceptance.observe(drafts, accepted)

    def report(self) -> dict:
        """For the stats file: steps per mode, chain acceptance per position, and per bucket the
        mode now run and each rate."""
        accept = [round(p / t, 3) if t else None for p, t in zip(self.acceptance.passed, self.acceptance.tried)]
        return {"steps": dict(self.steps), "chain_acceptance": accept,
                "buckets": {str(b): {"mode": st.mode,
                                     "tokens_per_s": {m: round(self.rate(b, m), 1)
                                                      for m in self.modes if st.measured(m)}}
                            for b, st in sorted(self.buckets.items())}}
