"""The measured schedule (policy/schedule.py) on synthetic step clocks: it finds the fastest mode
per load, pays little for measuring the others, and follows the traffic when it changes."""

import random
from collections import Counter

from vllm_respsp.policy.schedule import (
    NO_DRAFTS,
    POLICY,
    ChainAcceptance,
    MeasuredSchedule,
    ScheduleSettings,
    load_bucket,
    mode_shape,
    modes_within,
)
from vllm_respsp.tree.shape import NO_DRAFTS as NO_DRAFTS_SHAPE
from vllm_respsp.tree.shape import chain

MODES = (POLICY, "chain1", NO_DRAFTS)  # three modes keep the synthetic clocks short

# seconds and tokens per step, per mode, shaped like MT-Bench at batch 4 on the project's CPU:
# chain fastest (5.5 / 0.043 = 128 tokens/s), then no drafts (118), then the policy (112)
BATCH4 = {POLICY: (0.050, 5.6), "chain1": (0.043, 5.5), NO_DRAFTS: (0.034, 4.0)}


def run(schedule: MeasuredSchedule, costs: dict, steps: int, load: int = 4, clock: list | None = None) -> Counter:
    """Run `steps` decode steps at `load`; each mode's step takes and emits what `costs` says."""
    clock = clock if clock is not None else [0.0]
    ran = Counter()
    for _ in range(steps):
        mode = schedule.mode(load)
        seconds, tokens = costs[mode]
        clock[0] += seconds
        schedule.step_done(load, mode, tokens, True, clock[0])
        ran[mode] += 1
    return ran


def test_small_loads_are_measured_alone_and_modes_fit_the_draft_budget():
    assert [load_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 64)] == [1, 2, 3, 4, 5, 8, 16, 16, 32, 64]
    assert modes_within(8) == (POLICY, "chain1", "chain2", "chain3", NO_DRAFTS)
    assert modes_within(2) == (POLICY, "chain1", "chain2", NO_DRAFTS)
    assert [mode_shape(m) for m in modes_within(1)] == [None, chain(1), NO_DRAFTS_SHAPE]


def test_with_every_mode_it_finds_the_fastest_chain():
    # batch 1, MT-Bench-like: a chain of two drafts beats the policy and the other chains
    costs = {POLICY: (0.030, 1.49), "chain1": (0.028, 1.39), "chain2": (0.029, 1.56),
             "chain3": (0.031, 1.60), NO_DRAFTS: (0.025, 1.0)}
    schedule = MeasuredSchedule()
    ran = run(schedule, costs, 1500, load=1)
    assert schedule.modes == modes_within(8) and schedule.buckets[1].mode == "chain2"
    assert ran["chain2"] > 0.8 * 1500, ran


def test_it_measures_every_mode_then_runs_the_fastest():
    schedule = MeasuredSchedule(MODES)
    ran = run(schedule, BATCH4, 1000)
    bucket = schedule.buckets[4]
    assert bucket.mode == "chain1"
    assert abs(schedule.rate(4, "chain1") - 5.5 / 0.043) < 1e-6
    # measuring the two slower modes costs a few percent of the steps, not more
    assert ran["chain1"] > 0.9 * 1000
    assert all(ran[m] >= ScheduleSettings().min_samples for m in MODES)


def test_a_stalled_step_does_not_decide_the_mode():
    """One step of the running mode in twelve stalls for ten steps' time (a garbage collection):
    the median step time ignores it, where a sum of times would make the mode look 45% slower."""
    schedule, clock, ran = MeasuredSchedule(MODES), [0.0], Counter()
    for step in range(600):
        mode = schedule.mode(4)
        seconds, tokens = BATCH4[mode]
        clock[0] += seconds * (10 if mode == "chain1" and step % 12 == 0 else 1)
        schedule.step_done(4, mode, tokens, True, clock[0])
        ran[mode] += 1
    assert schedule.buckets[4].mode == "chain1" and ran["chain1"] > 0.85 * 600, ran


def test_a_mode_far_behind_is_measured_again_less_often():
    close = {POLICY: (0.050, 5.0), "chain1": (0.050, 5.1), NO_DRAFTS: (0.050, 2.0)}
    schedule = MeasuredSchedule(MODES)
    young = run(schedule, close, 2000)
    # until a mode has run settled_steps at the load, it is measured again every reprobe_steps
    assert young[POLICY] == young[NO_DRAFTS] and young["chain1"] > 0.95 * 2000
    settled = run(schedule, close, 6000)
    # then 2% behind: every reprobe_steps; 60% behind: every max_reprobe_steps
    assert settled[POLICY] > 2 * settled[NO_DRAFTS], settled


def test_the_step_after_a_switch_and_prefill_steps_are_not_measured():
    schedule = MeasuredSchedule(MODES, ScheduleSettings(warm_steps=0))
    schedule.mode(4)
    schedule.step_done(4, POLICY, 5, True, 1.0)  # first step: nothing before it
    schedule.step_done(4, POLICY, 5, False, 1.1)  # prefill in the step
    schedule.step_done(4, "chain1", 5, True, 1.2)  # switched mode: verifies the policy's drafts
    schedule.step_done(2, "chain1", 5, True, 1.3)  # the load changed
    schedule.step_done(2, None, 5, True, 1.4)  # the schedule did not choose this step
    schedule.step_done(2, None, 5, True, 1.5)
    schedule.step_done(2, "chain1", 5, True, 1.6)  # after an unscheduled step
    assert all(not b.samples for b in schedule.buckets.values())
    schedule.step_done(2, "chain1", 4, True, 1.8)
    assert list(schedule.buckets[2].samples["chain1"]) == [(4, 1.8 - 1.6, 2)]


def test_a_modes_first_steps_at_a_load_warm_up_unmeasured():
    schedule = MeasuredSchedule(MODES, ScheduleSettings(warm_steps=2))
    for step in range(5):
        schedule.step_done(4, "chain1", 5, True, 0.1 * step)
    # step 0 has nothing before it; steps 1-2 are the mode's first two decode steps at load 4
    assert [round(s[1], 6) for s in schedule.buckets[4].samples["chain1"]] == [0.1, 0.1]


def test_each_load_bucket_finds_its_own_mode():
    batch1 = {POLICY: (0.030, 2.4), "chain1": (0.028, 1.4), NO_DRAFTS: (0.025, 1.0)}
    schedule, clock = MeasuredSchedule(MODES), [0.0]
    for _ in range(20):  # interleaved, as loads move in serving
        run(schedule, batch1, 50, load=1, clock=clock)
        run(schedule, BATCH4, 50, load=4, clock=clock)
    assert schedule.buckets[1].mode == POLICY and schedule.buckets[4].mode == "chain1"
    report = schedule.report()
    assert report["buckets"]["1"]["mode"] == "policy" and report["buckets"]["4"]["mode"] == "chain1"
    assert sum(report["steps"].values()) == 2000


def test_it_follows_the_traffic_when_the_fastest_mode_changes():
    schedule = MeasuredSchedule(MODES)
    run(schedule, BATCH4, 500)
    assert schedule.buckets[4].mode == "chain1"
    # the prompts change: drafting stops paying (longer contexts make verification dear)
    later = {POLICY: (0.070, 5.6), "chain1": (0.060, 5.4), NO_DRAFTS: (0.040, 4.0)}
    run(schedule, later, 800)
    assert schedule.buckets[4].mode == NO_DRAFTS


def test_chain_acceptance_is_estimated_per_position():
    rng = random.Random(0)
    truth = (0.4, 0.35, 0.3)
    acceptance = ChainAcceptance()
    assert acceptance.tokens_per_request(1) is None  # nothing seen yet
    for _ in range(3000):
        drafts = rng.choice((1, 2, 3))
        accepted = 0
        while accepted < drafts and rng.random() < truth[accepted]:
            accepted += 1
        acceptance.observe(drafts, accepted)
    expected = [1 + 0.4, 1 + 0.4 + 0.4 * 0.35, 1 + 0.4 + 0.4 * 0.35 + 0.4 * 0.35 * 0.3]
    for k, want in zip((1, 2, 3), expected):
        assert abs(acceptance.tokens_per_request(k) - want) < 0.06, (k, acceptance.tokens_per_request(k))


def test_chains_are_judged_by_the_pooled_acceptance_not_their_own_few_steps():
    """chain2 happens to be measured while the prompts are easy (7 tokens a step at load 4);
    the acceptance pooled over every chain verified says it emits 6.4, which at its step time
    loses to chain1 (5.6): the schedule runs chain1."""
    schedule = MeasuredSchedule((POLICY, "chain1", "chain2", NO_DRAFTS))
    steps = {POLICY: (0.050, 5.6), "chain1": (0.043, 5.6), "chain2": (0.050, 7.0), NO_DRAFTS: (0.034, 4.0)}
    for _ in range(400):
        schedule.verified_chain(2, 0)  # q1 = 0.4, q2 = 0.5: 1.4 and 1.6 tokens per request
        schedule.verified_chain(2, 0)
        schedule.verified_chain(2, 1)
        schedule.verified_chain(2, 2)
        schedule.verified_chain(1, 0)
    ran = run(schedule, steps, 600)
    assert abs(schedule.rate(4, "chain2") - 4 * 1.6 / 0.050) < 1.0
    assert ran["chain1"] > 0.8 * 600, ran  # measured by its own steps, chain2 would win
    assert schedule.report()["chain_acceptance"][:2] == [0.4, 0.5]


def test_a_load_seen_rarely_starts_with_the_nearest_loads_best_mode():
    """A batch of 4 drains through 3, 2 and 1: those loads run the best mode measured at 4 and
    measure the others in their turn, not all of them in their few steps."""
    schedule, clock = MeasuredSchedule(MODES), [0.0]
    run(schedule, BATCH4, 200, load=4, clock=clock)
    tail = {m: (seconds * 0.8, tokens * 0.75) for m, (seconds, tokens) in BATCH4.items()}
    assert run(schedule, tail, 20, load=3, clock=clock) == {"chain1": 20}
    assert run(schedule, BATCH4, 300, load=3, clock=clock)[NO_DRAFTS] >= 4  # measured in its turn
