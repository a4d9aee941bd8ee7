"""respsp's start-up decisions for the platform vLLM runs on, made on the EngineArgs before vLLM
builds its config (so vLLM's own resolution sees them):

- CPU: vLLM's CPU platform picks its attention backend itself (CPU_ATTN); the runtime checks at
  the first step that it has a tree backend for what it got.
- CUDA / ROCm: the attention backend must be one respsp has a tree backend for. Unset, respsp
  selects TRITON_ATTN (vLLM's Triton attention, for every GPU vendor) and says so; set to
  another one, start-up fails naming it and the supported ones.
- CUDA graphs: tree metadata (masks, rows, prefix lengths) changes every step, so attention must
  run outside the graphs. Modes with full graphs become PIECEWISE (attention is the splitting op,
  eager between graph pieces); where piecewise graphs are impossible (compilation mode other
  than VLLM_COMPILE) graphs are turned off. One log line says which.
- Any other platform: one clear error.
"""

from __future__ import annotations

import logging

from vllm_respsp.backends import SUPPORTED

logger = logging.getLogger("vllm_respsp")
DEFAULT_GPU_BACKEND = "TRITON_ATTN"


class RespspStartupError(ValueError):
    """respsp cannot run with this platform / attention backend; the message says what can."""


def chosen_backend(engine_args) -> str | None:
    """The attention backend the user asked for (by name), or None for vLLM's choice."""
    for value in (engine_args.attention_backend, getattr(engine_args.attention_config, "backend", None)):
        if value is None:
            continue
        name = value.name if hasattr(value, "name") else str(value).upper()
        if name != "AUTO":
            return name
    return None


def configure_engine(engine_args, platform) -> list[str]:
    """Adjust `engine_args` for respsp on `platform`; returns the decisions it logged."""
    if platform.is_cpu():
        return []
    if not (platform.is_cuda() or platform.is_rocm()):
        raise RespspStartupError(
            f"method: respsp runs on vLLM's CPU, CUDA and ROCm platforms; this platform is "
            f"{getattr(platform, 'device_name', platform)!r}")
    decisions = [_select_backend(engine_args), _cuda_graph_mode(engine_args)]
    for line in decisions:
        logger.info("respsp: %s", line)
    return decisions


def _select_backend(engine_args) -> str:
    name = chosen_backend(engine_args)
    if name is None:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        engine_args.attention_config.backend = AttentionBackendEnum[DEFAULT_GPU_BACKEND]
        return (f"attention backend {DEFAULT_GPU_BACKEND} selected (none was chosen; respsp's tree "
                f"kernels read its KV layout)")
    if name not in SUPPORTED:
        raise RespspStartupError(
            f"attention_backend={name}: respsp has no tree-attention backend for it; allowed: "
            f"{list(SUPPORTED)} (or leave it unset and respsp selects {DEFAULT_GPU_BACKEND})")
    return f"attention backend {name} (chosen by the user)"


def _cuda_graph_mode(engine_args) -> str:
    from vllm.config.compilation import CompilationMode, CUDAGraphMode

    if engine_args.enforce_eager:
        return "CUDA graphs off (enforce_eager)"
    cc = engine_args.compilation_config
    if cc.mode is not None and cc.mode != CompilationMode.VLLM_COMPILE:
        cc.cudagraph_mode = CUDAGraphMode.NONE
        return (f"CUDA graphs off: compilation mode {cc.mode.name} cannot split graphs around attention, "
                f"and tree masks change every step")
    if cc.cudagraph_mode is None or cc.cudagraph_mode.has_full_cudagraphs():
        was = "vLLM's default" if cc.cudagraph_mode is None else cc.cudagraph_mode.name
        cc.cudagraph_mode = CUDAGraphMode.PIECEWISE
        return (f"CUDA graphs PIECEWISE (was {was}): attention runs outside the graphs, where tree "
                f"masks can change every step")
    return f"CUDA graphs {cc.cudagraph_mode.name} (attention already outside the graphs)"
