"""`method: "respsp"` in vLLM's speculative config (both `LLM(speculative_config=...)` and the
server's `--speculative-config` JSON pass through `EngineArgs.create_speculative_config`).

vLLM's `SpeculativeConfig` is a pydantic dataclass with a closed `method` list and no extra
keys, so the patch validates the respsp keys itself (`vllm_respsp.config.parse`: one clear
error per problem, at start-up) and hands vLLM an EAGLE-3 config of the subclass below, which
carries the respsp settings to every process and into the config hash.

What runs today: a respsp config whose shapes are all chains is executed by vLLM's own EAGLE-3
chain drafter and rejection sampler (a chain of n is exactly the (n, n, 1) tree). Tree shapes
need the tree runtime (drafter, tree attention, tree rejection sampler, KV compaction), which
is not wired into vLLM yet; they are refused at start-up with an error that says so.
"""

from __future__ import annotations

import hashlib
import json

from vllm.config import SpeculativeConfig
from vllm.config.utils import config

from vllm_respsp.config import METHOD, RespspConfigError, parse
from vllm_respsp.patches.registry import Patch


@config
class RespspSpeculativeConfig(SpeculativeConfig):
    """An EAGLE-3 `SpeculativeConfig` that also carries the respsp settings."""

    respsp: dict | None = None
    """`RespspConfig.to_dict()`: head, static shape, policy, action set."""

    def compute_hash(self) -> str:
        base = super().compute_hash()
        extra = json.dumps(self.respsp, sort_keys=True).encode()
        return hashlib.sha256(base.encode() + extra).hexdigest()


def to_vllm_config(raw: dict, target_model_config, target_parallel_config) -> RespspSpeculativeConfig:
    cfg = parse(raw)
    trees = [s for s in cfg.shapes if not s.is_chain]
    if trees:
        raise RespspConfigError(
            f"shape/actions: tree shapes {[str(s) for s in trees]} need the respsp tree runtime, "
            f"which this version does not have yet; allowed now: chains, "
            f'{{"total_tokens": n, "depth": n, "top_k": 1}}')
    if len({s.depth for s in cfg.shapes}) > 1 or cfg.policy != "static":
        raise RespspConfigError(
            "policy/actions: per-request shapes need the respsp tree runtime, which this version "
            'does not have yet; allowed now: "policy": "static" with one chain shape')
    return RespspSpeculativeConfig(
        method="eagle3", model=cfg.model, num_speculative_tokens=cfg.shape.depth,
        respsp=cfg.to_dict(), target_model_config=target_model_config,
        target_parallel_config=target_parallel_config)


class RespspSpeculativeConfigPatch(Patch):
    name = "respsp_speculative_config"
    target = "vllm.engine.arg_utils:EngineArgs.create_speculative_config"

    def replacement(self, original):
        def create_speculative_config(engine_args, target_model_config, target_parallel_config):
            raw = engine_args.speculative_config
            if not isinstance(raw, dict) or raw.get("method") != METHOD:
                return original(engine_args, target_model_config, target_parallel_config)
            return to_vllm_config({k.replace("-", "_"): v for k, v in raw.items()},
                                  target_model_config, target_parallel_config)

        return create_speculative_config
