"""vllm_respsp's changes to vLLM (the list: `all.py`; the mechanics: `registry.py`).

This package's root imports nothing of vLLM: the version check (`version.py`) runs first, and
the patch modules, which import vLLM internals that another vLLM may have moved, are imported
only when the installed vLLM is supported.
"""

from __future__ import annotations


def apply_patches() -> list[str]:
    """Every patch that applies here; on a vLLM respsp does not support, only the refusal."""
    from vllm_respsp.patches.registry import apply_all
    from vllm_respsp.patches.version import RefuseRespsp, check_version

    if not check_version():
        return apply_all([RefuseRespsp()])
    from vllm_respsp.patches.all import apply_patches as apply_every_patch

    return apply_every_patch()
