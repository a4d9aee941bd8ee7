"""Every change vllm_respsp makes to vLLM, in one list. See `registry.py` for the mechanics.
Imported only on a supported vLLM (`vllm_respsp.patches.apply_patches`)."""

from vllm_respsp.patches.cpu_amx import CpuAttentionAmxTiles
from vllm_respsp.patches.cpu_expand import CpuExpandKernelFix
from vllm_respsp.patches.registry import Patch, apply_all
from vllm_respsp.patches.runner import (
    RunnerAttentionMetadata,
    RunnerPrepareInputs,
    RunnerProposeDrafts,
    RunnerSample,
    RunnerStepClock,
)
from vllm_respsp.patches.speculative_config import RespspSpeculativeConfigPatch
from vllm_respsp.patches.tree_attention import CpuTreeAttention, FlashTreeAttention, TritonTreeAttention

ALL_PATCHES: list[Patch] = [
    # Bug fixes for the installed vLLM (each applies only where a probe finds the bug).
    CpuExpandKernelFix(),
    CpuAttentionAmxTiles(),
    # Accepts `method: "respsp"`; every other speculative config passes through unchanged.
    RespspSpeculativeConfigPatch(),
    # The tree runtime; each does nothing unless the runner's config is respsp.
    RunnerPrepareInputs(),
    RunnerAttentionMetadata(),
    CpuTreeAttention(),
    TritonTreeAttention(),
    FlashTreeAttention(),
    RunnerSample(),
    RunnerProposeDrafts(),
    # Measurement only: per-step wall times for `engine_tools.profile` (VLLM_RESPSP_STEP_TIMES set).
    RunnerStepClock(),
]


def apply_patches() -> list[str]:
    return apply_all(ALL_PATCHES)
