"""vLLM general-plugin entry point (`vllm.general_plugins` -> `respsp`).

vLLM calls `register()` in every process it starts. It must be cheap, idempotent and leave
vLLM's behaviour unchanged unless a speculative config asks for `respsp`, except where the
installed vLLM is demonstrably broken (the bug fixes in `vllm_respsp.patches`).
"""

import logging

logger = logging.getLogger("vllm_respsp")


def request_amx_tiles() -> bool:
    """Ask Linux for the AMX tile state in this process (what torch does before its own AMX
    kernels). vLLM 0.32's bf16 CPU attention runs AMX tile instructions without asking, so on an
    AMX CPU where nothing else asked first the engine dies with SIGILL (seen 2026-12-05 with plain
    vLLM, no plugin: a bf16 engine on a 2-head fixture; fine once asked). False where the CPU
    has no AMX or torch lacks the call."""
    import torch

    init_amx = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    return bool(init_amx and init_amx())


def register() -> None:
    from vllm_respsp.patches import apply_patches

    amx = request_amx_tiles()
    logger.debug("vllm_respsp: AMX tile state requested: %s", amx)
    applied = apply_patches()
    logger.debug("vllm_respsp: patches applied in this process: %s", applied)
