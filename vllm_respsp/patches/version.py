"""The vLLM versions respsp's patches were read against, and what happens on any other.

respsp hooks private seams of vLLM's model runner, attention backends and config; a different
vLLM can move them, and would then fail deep inside a patch. So at plugin load: on a version
outside `SUPPORTED_VLLM` one warning is logged, no patch that changes vLLM is applied (other vLLM
use stays untouched), and `method: respsp` is refused with a clear error (`RefuseRespsp`).
`VLLM_RESPSP_ALLOW_ANY_VLLM=1` applies the patches anyway.
"""

from __future__ import annotations

import logging

from vllm_respsp import envs
from vllm_respsp.patches.registry import Patch

logger = logging.getLogger("vllm_respsp")
SUPPORTED_VLLM = ((0, 32),)  # (major, minor) release lines


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def is_supported(version: str) -> bool:
    try:
        major, minor = (int(p) for p in version.split("+")[0].split(".")[:2])
    except ValueError:
        return False
    return (major, minor) in SUPPORTED_VLLM


def supported_text() -> str:
    return ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VLLM)


class RefuseRespsp(Patch):
    """On an unsupported vLLM: `method: respsp` fails at start-up naming the versions; every other
    speculative config passes through unchanged."""

    name = "refuse_respsp_on_unsupported_vllm"
    target = "vllm.engine.arg_utils:EngineArgs.create_speculative_config"

    def replacement(self, original):
        from vllm_respsp.config import METHOD, RespspConfigError

        version = vllm_version()

        def create_speculative_config(engine_args, *args, **kwargs):
            raw = engine_args.speculative_config
            if isinstance(raw, dict) and raw.get("method") == METHOD:
                raise RespspConfigError(
                    f"method: respsp supports vLLM {supported_text()}; this is vLLM {version}. Install a "
                    f"supported vLLM, or set {envs.ALLOW_ANY_VLLM}=1 to try anyway")
            return original(engine_args, *args, **kwargs)

        return create_speculative_config


def check_version() -> bool:
    """True when the installed vLLM is supported (or the user allows any)."""
    version = vllm_version()
    if is_supported(version):
        return True
    if envs.allow_any_vllm():
        logger.warning("vllm_respsp: vLLM %s is not one respsp was checked against (%s); %s=1 is set, "
                       "so its patches are applied anyway", version, supported_text(), envs.ALLOW_ANY_VLLM)
        return True
    logger.warning("vllm_respsp: vLLM %s is not supported (respsp supports %s): respsp is off in this "
                   "process and `method: respsp` will be refused; the rest of vLLM is untouched",
                   version, supported_text())
    return False
