"""`method: "respsp"` in vLLM's speculative config (both `LLM(speculative_config=...)` and the
server's `--speculative-config` JSON pass through `EngineArgs.create_speculative_config`).

vLLM's `SpeculativeConfig` is a pydantic dataclass with a closed `method` list and no extra
keys, so the patch validates the respsp keys itself (`vllm_respsp.config.parse`: one clear
error per problem, at start-up) and hands vLLM an EAGLE-3 config of the subclass below, which
carries the respsp settings to every process and into the config hash.

vLLM's `num_speculative_tokens` becomes the largest tree any step may verify, so the scheduler
reserves enough slots; each request is then scheduled with its own tree's size (drafts are
ragged lists).

vLLM drops the last block of every prefix-cache hit for EAGLE-like methods, because that block's
last draft-KV row was written with a next token that the new request may not share. respsp keeps
the whole hit (`disable_eagle_block_drop`), as no speculation does: such a row only weakens one
draft, never an output (verification is exact, see `runtime.head_kv`), while the dropped block
is a block of prefill recomputed for every request that shares a prompt's start (a system
prompt).

The platform's start-up decisions (attention backend, CUDA-graph mode) are made here too, on
the engine args, before vLLM builds its config (`backends.startup`).
"""

from __future__ import annotations

import hashlib
import json

from vllm.config import SpeculativeConfig
from vllm.config.utils import config

from vllm_respsp.backends.startup import RespspStartupError, configure_engine
from vllm_respsp.config import METHOD, RespspConfigError, check_head_matches_target, check_policy_matches_target, parse
from vllm_respsp.patches.registry import Patch
from vllm_respsp.runtime import metrics


@config
class RespspSpeculativeConfig(SpeculativeConfig):
    """An EAGLE-3 `SpeculativeConfig` that also carries the respsp settings."""

    respsp: dict | None = None
    """`RespspConfig.to_dict()`: head, static shape, policy, action set, schedule."""

    def compute_hash(self) -> str:
        base = super().compute_hash()
        extra = json.dumps(self.respsp, sort_keys=True).encode()
        return hashlib.sha256(base.encode() + extra).hexdigest()


def current_platform():
    from vllm.platforms import current_platform

    return current_platform


def to_vllm_config(raw: dict, target_model_config, target_parallel_config) -> RespspSpeculativeConfig:
    cfg = parse(raw)
    check_head_matches_target(cfg.model, target_model_config.get_hidden_size(),
                              target_model_config.get_vocab_size())
    check_policy_matches_target(cfg, target_model_config.get_hidden_size())
    return RespspSpeculativeConfig(
        method="eagle3", model=cfg.model, num_speculative_tokens=cfg.max_total_tokens,
        disable_eagle_block_drop=True, respsp=cfg.to_dict(), target_model_config=target_model_config,
        target_parallel_config=target_parallel_config)


class RespspSpeculativeConfigPatch(Patch):
    name = "respsp_speculative_config"
    target = "vllm.engine.arg_utils:EngineArgs.create_speculative_config"

    def replacement(self, original):
        def create_speculative_config(engine_args, target_model_config, target_parallel_config):
            raw = engine_args.speculative_config
            if not isinstance(raw, dict) or raw.get("method") != METHOD:
                return original(engine_args, target_model_config, target_parallel_config)
            spec = to_vllm_config({k.replace("-", "_"): v for k, v in raw.items()},
                                  target_model_config, target_parallel_config)
            try:
                configure_engine(engine_args, current_platform())
            except RespspStartupError as e:
                raise RespspConfigError(str(e)) from None
            metrics.setup_frontend()  # respsp's counters on this process's /metrics
            return spec

        return create_speculative_config
