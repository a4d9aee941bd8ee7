"""policy.profile's arithmetic: a decode step from a short and a long run. (Its engine runs,
minutes per configuration, are `make policy`'s; the NO_DRAFTS policy it times them with is
tested in test_policy_file.)"""

import pytest

from vllm_respsp.policy.profile import difference, fastest_step


def test_difference_cancels_what_both_runs_pay():
    # 0.5 s of prefill and start-up in both, 40 ms a step: 7 and 39 steps
    assert difference([0.5 + 7 * 0.04, 0.5 + 39 * 0.04], [7, 39]) == pytest.approx(0.04)


def test_fastest_step_ignores_a_repetition_the_machine_slowed():
    quiet = ([0.78, 2.06], [7, 39])
    noisy_long = ([0.78, 3.50], [7, 39])  # another job took the cores during the long run
    noisy_short = ([1.40, 2.06], [7, 39])
    assert fastest_step([quiet, noisy_long, noisy_short]) == pytest.approx(0.04)
    assert fastest_step([noisy_long, noisy_short]) == pytest.approx(0.04)  # each length's best
