"""vLLM general-plugin entry point (`vllm.general_plugins` -> `respsp`).

vLLM calls `register()` in every process it starts. It must be cheap, idempotent and leave
vLLM's behaviour unchanged unless a speculative config asks for `respsp`, except where the
installed vLLM is demonstrably broken (the bug fixes in `vllm_respsp.patches`).
"""

import logging

logger = logging.getLogger("vllm_respsp")


def register() -> None:
    from vllm_respsp.patches import apply_patches

    applied = apply_patches()
    logger.debug("vllm_respsp: patches applied in this process: %s", applied)
