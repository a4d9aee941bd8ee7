"""One place that decides between a Triton kernel and its PyTorch reference.

Rule: run the Triton kernel when the inputs live on a CUDA device, or when the
Triton interpreter (``TRITON_INTERPRET=1``) was switched on before this package
was imported; otherwise run the PyTorch reference, which is the CPU production
path.  The interpreter flag is read once, at import, because ``triton.jit``
decides at decoration time whether a kernel is compiled or interpreted: a flag
set later would route CPU tensors into compiled kernels.

The package imports without Triton installed; then only references run.
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: a CPU-only install runs the references.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    HAS_TRITON = False

    class _ConstexprStub:
        """Lets the kernel signatures (``BLOCK: tl.constexpr``) evaluate."""

    class _TlStub:
        constexpr = _ConstexprStub

    class _TritonStub:
        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = _TritonStub()  # type: ignore[assignment]
    tl = _TlStub()  # type: ignore[assignment]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def use_triton(tensor: torch.Tensor) -> bool:
    """True when ``tensor``'s operation should run as a Triton kernel."""
    if not HAS_TRITON:
        return False
    return tensor.is_cuda or INTERPRET


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


__all__ = ["HAS_TRITON", "INTERPRET", "next_pow2", "tl", "triton", "use_triton"]
