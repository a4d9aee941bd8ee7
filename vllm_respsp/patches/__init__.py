"""Every change vllm_respsp makes to vLLM, in one list. See `registry.py` for the mechanics."""

from vllm_respsp.patches.cpu_expand import CpuExpandKernelFix
from vllm_respsp.patches.registry import Patch, apply_all

# Bug fixes for the installed vLLM: applied whenever the plugin loads (each checks it is needed).
BUG_FIXES: list[Patch] = [CpuExpandKernelFix()]


def apply_bug_fixes() -> list[str]:
    return apply_all(BUG_FIXES)
