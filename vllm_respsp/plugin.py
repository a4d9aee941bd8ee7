"""vLLM general-plugin entry point (`vllm.general_plugins` -> `respsp`).

vLLM calls `register()` in every process it starts. It must be cheap, idempotent and leave
vLLM's behaviour unchanged except where the installed vLLM is demonstrably broken (the bug
fixes in `vllm_respsp.patches`).
"""

import logging

logger = logging.getLogger("vllm_respsp")


def register() -> None:
    from vllm_respsp.patches import apply_bug_fixes

    applied = apply_bug_fixes()
    if applied:
        logger.info("vllm_respsp: applied bug fixes %s", applied)
