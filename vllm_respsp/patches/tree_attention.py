"""Tree attention inside vLLM's attention backends: after a backend's own forward, the rows of the
step's non-chain trees are recomputed through their ancestor masks by the respsp backend for it
(`vllm_respsp.backends`). The step's trees reach the layer on its attention metadata
(`respsp_trees`, set by patches.runner); layers of engines without respsp never see any."""

from __future__ import annotations

from vllm_respsp.backends import for_vllm_backend
from vllm_respsp.patches.registry import Patch


class TreeAttentionPatch(Patch):
    """Wrap one vLLM attention implementation's `forward`."""

    vllm_backend: str

    def replacement(self, original):
        backend = for_vllm_backend(self.vllm_backend)

        def forward(impl, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
            result = original(impl, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
            trees = getattr(attn_metadata, "respsp_trees", None)
            if trees is not None and impl.attn_type == "decoder":
                backend.attend(impl, layer, query, kv_cache, attn_metadata, output, trees)
            return result

        return forward


class CpuTreeAttention(TreeAttentionPatch):
    name = "cpu_tree_attention"
    target = "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl.forward"
    vllm_backend = "CPU_ATTN"

    def applies(self) -> bool:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()


class TritonTreeAttention(TreeAttentionPatch):
    name = "triton_tree_attention"
    target = "vllm.v1.attention.backends.triton_attn:TritonAttentionImpl.forward"
    vllm_backend = "TRITON_ATTN"


class FlashTreeAttention(TreeAttentionPatch):
    name = "flash_tree_attention"
    target = "vllm.v1.attention.backends.flash_attn:FlashAttentionImpl.forward"
    vllm_backend = "FLASH_ATTN"

    def applies(self) -> bool:
        from vllm.platforms import current_platform

        return current_platform.is_cuda()  # FlashAttention's kernels exist nowhere else
