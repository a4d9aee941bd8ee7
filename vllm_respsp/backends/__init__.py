"""Tree-attention backends: respsp's runtime over vLLM's attention layouts (see base.py).

One respsp backend per vLLM attention backend it can read. `for_vllm_backend(name)` gives the
backend for a vLLM backend name, or None; `SUPPORTED` lists the names, for errors.
"""

from __future__ import annotations

from vllm_respsp.backends.base import TreeAttentionBackend
from vllm_respsp.backends.cpu import CpuTreeBackend
from vllm_respsp.backends.triton import FlashTreeBackend, TritonTreeBackend

BACKENDS: dict[str, type[TreeAttentionBackend]] = {
    CpuTreeBackend.vllm_backend: CpuTreeBackend,
    TritonTreeBackend.vllm_backend: TritonTreeBackend,
    FlashTreeBackend.vllm_backend: FlashTreeBackend,
}
SUPPORTED = tuple(BACKENDS)


def for_vllm_backend(name: str | None) -> TreeAttentionBackend | None:
    cls = BACKENDS.get(name or "")
    return cls() if cls is not None else None


__all__ = ["BACKENDS", "SUPPORTED", "TreeAttentionBackend", "for_vllm_backend"]
