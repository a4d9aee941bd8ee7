"""engine_tools.profile's arithmetic: decode steps from the engine's step clock. (Its engine runs,
minutes per configuration, are `make policy`'s; the step clock itself runs in
test_respsp_policy; the NO_DRAFTS policy it times them with is tested in test_policy_file.)"""

import pytest

from vllm_respsp.engine_tools.profile import decode_steps, max_tokens_per_request
from vllm_respsp.tree.shape import chain


def test_decode_steps_are_the_steps_running_every_request_with_few_tokens():
    lines = "\n".join([
        "10.000 4 900",  # prefill of 4 prompts
        "10.300 4 8",    # decode: 4 requests x (1 + 1 draft)
        "10.340 4 8",
        "10.385 4 6",    # fewer drafts scheduled: still a decode step
        "10.420 3 6",    # one request finished: not the batch being measured
        "10.450 3 6",
    ])
    assert decode_steps(lines, 4, max_tokens_per_request(chain(1))) == pytest.approx([0.040, 0.045, 0.035])
    assert decode_steps("", 4, 2) == [] and decode_steps("1.0 4 8", 4, 2) == []  # no next step: no time
    assert max_tokens_per_request(None) == 1
