"""The EAGLE-3 draft head in plain PyTorch, computing what vLLM 0.32's `llama_eagle3.py` does.

One decoder layer ("midlayer") whose attention reads [input_layernorm(embed(token)),
hidden_norm(hidden)] (2 * h inputs), then the final norm and a reduced-vocabulary lm_head.
`hidden` is fc(concat of the target's 3 aux states) at the first draft step and the head's own
pre-norm output (residual + attn + mlp) at every later step; the residual stream starts from
the un-normed `hidden`. Parameter names are the checkpoint keys vLLM loads, so export is a
dtype cast plus d2t/t2d. The token embedding is the target's, frozen and not exported (vLLM
shares the target's when `embed_tokens.weight` is absent).

Training-time test (`unrolled`): the head runs `steps` draft steps over every position i
of a sequence at once, exactly as vLLM drafts after position i:
  step 0: token x[i+1], hidden fc(aux[i]), RoPE position i, attends to step-0 keys at j <= i;
  step k: token x[i+k+1], hidden = its own step-(k-1) output at row i, RoPE position i+k,
          attends to the step-0 keys at j <= i plus its own keys of steps 1..k at row i.
It predicts x[i+k+2]. Ground-truth input tokens are right for greedy verification: a draft at
depth k only counts when the k drafts before it equalled the target's tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class HeadConfig:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    draft_vocab_size: int
    aux_layers: tuple[int, ...]
    # One RMSNorm per aux state before fc (vLLM's `fc_norm` option). The target's residual
    # stream has massive activations: typical tokens have RMS ~3 / ~6 / ~23 at layers 2 / 15 /
    # 27, attention-sink tokens ~1000 (one dimension ~25k). Raw into fc, the sinks dominate
    # the gradients and the deepest layer drowns the others.
    fc_norm: bool = True

    @classmethod
    def from_target(cls, target_cfg: dict, draft_vocab_size: int, aux_layers) -> HeadConfig:
        rope = target_cfg.get("rope_parameters") or {}
        return cls(
            hidden_size=target_cfg["hidden_size"],
            intermediate_size=target_cfg["intermediate_size"],
            num_heads=target_cfg["num_attention_heads"],
            num_kv_heads=target_cfg["num_key_value_heads"],
            head_dim=target_cfg.get("head_dim") or target_cfg["hidden_size"] // target_cfg["num_attention_heads"],
            rms_norm_eps=target_cfg["rms_norm_eps"],
            rope_theta=float(target_cfg.get("rope_theta") or rope.get("rope_theta", 10000.0)),
            vocab_size=target_cfg["vocab_size"],
            draft_vocab_size=draft_vocab_size,
            aux_layers=tuple(aux_layers),
        )


class RMSNorm(nn.Module):
    """vLLM's RMSNorm: normalise in fp32, cast back, then scale."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Neox-style rotary embedding (Llama's): x [..., T, D], positions [..., T] broadcastable."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (torch.arange(half, dtype=torch.float32, device=x.device) / half)
    angles = positions.float()[..., None] * inv_freq  # [..., T, half]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(2 * h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(2 * h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(2 * h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)


class MLP(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MidLayer(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)


class Eagle3Head(nn.Module):
    def __init__(self, cfg: HeadConfig, target_embedding: torch.Tensor, draft_to_target: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.fc = nn.Linear(len(cfg.aux_layers) * h, h, bias=False)
        if cfg.fc_norm:
            self.fc_norm = nn.ModuleList([RMSNorm(h, cfg.rms_norm_eps) for _ in cfg.aux_layers])
        self.midlayer = MidLayer(cfg)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
        self.register_buffer("embed_tokens", target_embedding.clone(), persistent=False)
        self.register_buffer("draft_to_target", draft_to_target.long(), persistent=False)
        target_to_draft = torch.full((cfg.vocab_size,), -100, dtype=torch.long)  # -100 = CE ignore
        target_to_draft[draft_to_target] = torch.arange(len(draft_to_target))
        self.register_buffer("target_to_draft", target_to_draft, persistent=False)

    def combine_aux(self, aux: torch.Tensor) -> torch.Tensor:
        """vLLM's combine_hidden_states: [..., 3h] target aux states -> [..., h] first hidden."""
        if not torch.is_autocast_enabled("cpu"):
            aux = aux.to(self.fc.weight.dtype)
        if self.cfg.fc_norm:
            aux = torch.cat([norm(c) for norm, c in zip(self.fc_norm, aux.chunk(len(self.fc_norm), -1))], -1)
        return self.fc(aux)

    def _qkv(self, tokens, hidden, positions):
        """q [B, Hq, T, D], k/v [B, Hkv, T, D] for one draft step; also the residual input."""
        layer, cfg = self.midlayer, self.cfg
        x = torch.cat([layer.input_layernorm(F.embedding(tokens, self.embed_tokens)),
                       layer.hidden_norm(hidden)], dim=-1)
        B, T, _ = x.shape
        q = layer.self_attn.q_proj(x).view(B, T, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = layer.self_attn.k_proj(x).view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = layer.self_attn.v_proj(x).view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        pos = positions[:, None, :]
        return rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta), v

    def _finish(self, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """o_proj, residual add, MLP: returns the pre-norm output (the next step's hidden)."""
        B, H, T, D = attn.shape
        residual = residual + self.midlayer.self_attn.o_proj(attn.transpose(1, 2).reshape(B, T, H * D))
        return residual + self.midlayer.mlp(self.midlayer.post_attention_layernorm(residual))

    def logits(self, prenorm: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(prenorm))

    def unrolled(self, input_ids: torch.Tensor, aux: torch.Tensor, lengths: torch.Tensor, steps: int,
                 deep_rows: torch.Tensor | None = None):
        """Pre-norm outputs of draft steps 0..steps-1 at every row (see module doc).

        input_ids [B, T] (padded), aux [B, T, 3h], lengths [B]. Returns a list of [B, T, h];
        step k's row i is meaningful where i + k + 2 < length. With `deep_rows` (row indices),
        steps 1.. run only on those rows and return [B, len(deep_rows), h]: a row's deep steps
        read only the shared step-0 keys and its own chain, so a subset of rows is exact for
        those rows and cuts the cost of the training-time test in proportion.
        """
        B, T = input_ids.shape
        group = self.cfg.num_heads // self.cfg.num_kv_heads
        rows = torch.arange(T, device=input_ids.device)
        # Step-0 keys: j <= i (causal) and j inside the sequence.
        mask0 = (rows[None, :] <= rows[:, None])[None] & (rows[None, None, :] < lengths[:, None, None])
        mask0 = mask0[:, None]  # [B, 1, T, T]
        hidden = self.combine_aux(aux)
        outputs, diag_k, diag_v = [], [], []
        for k in range(steps):
            # Input token of step k at row i is x[i+k+1]; rows past the end read a pad token.
            tokens = F.pad(input_ids[:, k + 1:], (0, k + 1), value=0)
            positions = (rows + k)[None].expand(B, T)
            if k >= 1 and deep_rows is not None:
                tokens, positions = tokens[:, deep_rows], positions[:, deep_rows]
                if k == 1:  # later steps inherit the subset through `hidden`
                    hidden, mask0 = hidden[:, deep_rows], mask0[:, :, deep_rows]
            q, key, value = self._qkv(tokens, hidden, positions)
            key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
            if k == 0:
                k0, v0 = key, value
                attn = F.scaled_dot_product_attention(q, k0, v0, attn_mask=mask0)
            else:
                diag_k.append(key)
                diag_v.append(value)
                scale = self.cfg.head_dim ** -0.5
                s0 = (q @ k0.transpose(-1, -2) * scale).masked_fill(~mask0, float("-inf"))
                sd = torch.stack([(q * dk).sum(-1) for dk in diag_k], dim=-1) * scale  # [B,H,T,k]
                p = torch.cat([s0, sd], dim=-1).softmax(-1)
                attn = p[..., :T] @ v0 + sum(p[..., T + m, None] * dv for m, dv in enumerate(diag_v))
            hidden = self._finish(attn, hidden)
            outputs.append(hidden)
        return outputs

    def labels(self, input_ids: torch.Tensor, lengths: torch.Tensor, reply_starts: torch.Tensor, steps: int):
        """Draft-vocab label of step k at row i: x[i+k+2], or -100 where it does not count
        (past the end, not a reply token, or outside the draft vocabulary)."""
        B, T = input_ids.shape
        rows = torch.arange(T, device=input_ids.device)[None]
        out = []
        for k in range(steps):
            target_pos = rows + k + 2
            tokens = F.pad(input_ids[:, k + 2:], (0, k + 2), value=0)
            valid = (target_pos < lengths[:, None]) & (target_pos >= reply_starts[:, None])
            out.append(torch.where(valid, self.target_to_draft[tokens], -100))
        return out


def checkpoint_config(cfg: HeadConfig, target_cfg: dict) -> dict:
    """The config.json vLLM 0.32 reads for an EAGLE-3 head (same shape as fixtures.py's)."""
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "draft_vocab_size": cfg.draft_vocab_size,
        "hidden_size": cfg.hidden_size,
        "target_hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": target_cfg["max_position_embeddings"],
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "eagle_aux_hidden_state_layer_ids": list(cfg.aux_layers),
        "fc_norm": cfg.fc_norm,
        "respsp_head_config": asdict(cfg),
    }


def export_head(head: Eagle3Head, target_cfg: dict, out: Path) -> Path:
    """Write config.json + model.safetensors (bf16, without embed_tokens) loadable by vLLM."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to(torch.bfloat16).contiguous() for name, p in head.state_dict().items()}
    n = head.cfg.draft_vocab_size
    tensors["d2t"] = head.draft_to_target - torch.arange(n)
    t2d = torch.zeros(head.cfg.vocab_size, dtype=torch.bool)
    t2d[head.draft_to_target] = True
    tensors["t2d"] = t2d
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(checkpoint_config(head.cfg, target_cfg), indent=2))
    return out


def load_head(folder: Path, target_path: Path, dtype=torch.float32) -> Eagle3Head:
    """An exported head back as an Eagle3Head (embedding from the target), for offline checks."""
    from safetensors.torch import load_file

    cfg_json = json.loads((folder / "config.json").read_text())
    hc = cfg_json["respsp_head_config"]
    cfg = HeadConfig(**{**hc, "aux_layers": tuple(hc["aux_layers"])})
    tensors = load_file(str(folder / "model.safetensors"))
    d2t = tensors.pop("d2t")
    tensors.pop("t2d")
    draft_to_target = d2t + torch.arange(len(d2t))
    head = Eagle3Head(cfg, target_embedding(target_path), draft_to_target)
    head.load_state_dict({k: v.float() for k, v in tensors.items()})
    return head.to(dtype)


def target_embedding(target_path: Path) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(target_path / "model.safetensors"), "pt") as f:
        return f.get_tensor("model.embed_tokens.weight").float()


def draft_vocab_from_counts(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` most frequent target ids, sorted ascending (d2t = these - arange)."""
    top = torch.topk(counts, size).indices
    return torch.sort(top).values
