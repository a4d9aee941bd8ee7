"""The loaded EAGLE-3 head, run step by step with attention that respsp supplies.

vLLM loads the head (`runner.drafter.model`, an `Eagle3LlamaForCausalLM`) with its own
weights mapping, norms and draft vocabulary; respsp reuses every module of it except the
attention kernel, because tree drafting needs per-request context caches plus per-node ancestor
keys, which vLLM's paged draft attention cannot express. So a draft step here is vLLM's
`LlamaDecoderLayer.forward` for layer 0 with `self.attn(q, k, v)` replaced by a callback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


class HeadError(ValueError):
    """The loaded draft module is not an EAGLE-3 head respsp can drive."""


@dataclass
class StepInputs:
    """q [N, Hq, D], k/v [N, Hkv, D] after RoPE, and the residual stream entering attention."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    residual: torch.Tensor


class HeadAdapter:
    """A vLLM-loaded EAGLE-3 head as three calls: `combine`, `step_inputs`, `step_outputs`."""

    def __init__(self, model: torch.nn.Module):
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if inner is None or layers is None or not hasattr(model, "combine_hidden_states"):
            raise HeadError(f"draft model {type(model).__name__} is not an EAGLE-3 head")
        if len(layers) != 1:
            raise HeadError(f"respsp drafts with one-layer EAGLE-3 heads; this one has {len(layers)} layers")
        self.model = model
        self.layer = layers[0]
        self.attn = self.layer.self_attn
        self.num_heads = self.attn.num_heads
        self.num_kv_heads = self.attn.num_kv_heads
        self.head_dim = self.attn.head_dim
        self.scale = float(self.attn.scaling)
        d2t = getattr(model, "draft_id_to_target_id", None)
        vocab = model.config.draft_vocab_size if d2t is not None else model.config.vocab_size
        base = torch.arange(vocab, device=model.lm_head.weight.device)
        # draft vocabulary id -> target vocabulary id (d2t stores offsets, as vLLM's loader does)
        self.draft_to_target = base + d2t.detach().long() if d2t is not None else base

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    def combine(self, aux: torch.Tensor) -> torch.Tensor:
        """Target aux states [N, 3h] -> first draft hidden [N, h] (vLLM's fc, norms included)."""
        return self.model.combine_hidden_states(aux.to(self.dtype))

    def step_inputs(self, hidden: torch.Tensor, target_tokens: torch.Tensor,
                    positions: torch.Tensor) -> StepInputs:
        layer, attn = self.layer, self.attn
        hidden = hidden.clone()  # vLLM's fused add-norms update the residual in place
        embeds = layer.input_layernorm(self.model.embed_input_ids(target_tokens))
        normed, residual = layer._residual_norm(hidden_states=hidden)
        qkv, _ = attn.qkv_proj(torch.cat([embeds, normed], dim=-1))
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        n = hidden.shape[0]
        return StepInputs(q.reshape(n, self.num_heads, self.head_dim),
                          k.reshape(n, self.num_kv_heads, self.head_dim),
                          v.reshape(n, self.num_kv_heads, self.head_dim), residual)

    def step_outputs(self, attn_out: torch.Tensor, residual: torch.Tensor, logit_rows=None):
        """attn_out [N, Hq, D] -> (pre-norm hidden for the next step, draft log-probs of
        `logit_rows` (default: all rows) [n, V])."""
        out, _ = self.attn.o_proj(attn_out.reshape(attn_out.shape[0], -1).to(self.dtype))
        out, residual = self.layer.post_attention_layernorm(out, residual)
        out = self.layer.mlp(out)
        normed, prenorm = self.model.model.norm(out, residual)
        if logit_rows is not None:
            normed = normed[logit_rows]
        logits = self.model.logits_processor(self.model.lm_head, normed)
        return prenorm, torch.log_softmax(logits.float(), dim=-1)

    def step(self, hidden, target_tokens, positions,
             attend: Callable[[StepInputs], torch.Tensor], logit_rows=None):
        """One draft step for N rows; `attend` maps the step's q/k/v to attention outputs."""
        inputs = self.step_inputs(hidden, target_tokens, positions)
        return inputs, *self.step_outputs(attend(inputs), inputs.residual, logit_rows)
