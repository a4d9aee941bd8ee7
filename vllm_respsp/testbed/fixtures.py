"""Tiny models built by code, offline, in seconds, for tests that must run real vLLM.

- `tiny_random_llama`: a random 2-layer Llama with a 128-word tokenizer.
- `successor_llama` + `successor_eagle3_head`: a target whose greedy next token is always
  t+1 (mod vocab), and an EAGLE-3 head wired to draft t+1, t+2, ... for it. Acceptance is
  ~100%, so any lossless-verification bug shows up as a token mismatch, not as noise.
- `random_eagle3_head`: a random EAGLE-3 head with a reduced draft vocabulary (d2t/t2d maps),
  loadable on any Llama target.

How the successor pair works. Token t is embedded as a * e_t (one-hot; hidden size = vocab
size). Every target layer is an identity (o_proj and down_proj are zero), so the final hidden
state is a * e_t and the lm_head row of token s is c * e_(s-1): the argmax is t+1, by a margin
`c` that makes even temperature sampling deterministic in practice.
EAGLE-3 feeds the head fc(target aux states of token t) and then, at each further draft step,
its own pre-norm output. The head keeps the representation "k * e_s means: next is s+1":
fc maps a*e_t to k*e_t, attention contributes nothing (o_proj = 0), and the MLP adds
k*(e_(s+1) - e_s) for any input k*e_s (gate = a large constant, up = shift - identity), so the
residual stream becomes k * e_(s+1) at every step. The draft lm_head equals the target's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB_SIZE = 128
SPECIAL_TOKENS = {"<unk>": 0, "<s>": 1, "</s>": 2}
EAGLE3_AUX_LAYERS = [0, 1, 2]  # hidden states entering layers 0, 1 and 2 of a 3-layer target


def word(i: int) -> str:
    inverse = {v: k for k, v in SPECIAL_TOKENS.items()}
    return inverse.get(i, f"w{i}")


def _write_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word(i): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(path))


def _llama_config(vocab_size: int, hidden: int, layers: int, heads: int, head_dim: int, **extra) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 1,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": SPECIAL_TOKENS["<s>"],
        "eos_token_id": SPECIAL_TOKENS["</s>"],
        "torch_dtype": "float32",
        **extra,
    }


def _random_llama_weights(cfg: dict, gen: torch.Generator, std: float = 0.05) -> dict[str, torch.Tensor]:
    h, v, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    q_dim = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_dim = cfg["num_key_value_heads"] * cfg["head_dim"]

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * std

    w = {"model.embed_tokens.weight": rand(v, h) * 20, "model.norm.weight": torch.ones(h),
         "lm_head.weight": rand(v, h) * 20}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {
            p + "self_attn.q_proj.weight": rand(q_dim, h),
            p + "self_attn.k_proj.weight": rand(kv_dim, h),
            p + "self_attn.v_proj.weight": rand(kv_dim, h),
            p + "self_attn.o_proj.weight": rand(h, q_dim),
            p + "mlp.gate_proj.weight": rand(inter, h),
            p + "mlp.up_proj.weight": rand(inter, h),
            p + "mlp.down_proj.weight": rand(h, inter),
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
        }
    return w


def _save(path: Path, config: dict, weights: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def tiny_random_llama(path: str | os.PathLike, seed: int = 0) -> Path:
    """A random 3-layer Llama (hidden 128, 2 heads of 64) with a 128-word tokenizer."""
    path = Path(path)
    cfg = _llama_config(VOCAB_SIZE, hidden=128, layers=3, heads=2, head_dim=64)
    gen = torch.Generator().manual_seed(seed)
    _save(path, cfg, _random_llama_weights(cfg, gen))
    _write_tokenizer(path, VOCAB_SIZE)
    return path


def successor_llama(path: str | os.PathLike, margin: float = 40.0, seed: int = 0) -> Path:
    """A Llama whose greedy next token is always (t + 1) mod vocab; logit margin `margin`."""
    path = Path(path)
    v = h = VOCAB_SIZE
    cfg = _llama_config(v, hidden=h, layers=3, heads=2, head_dim=64)
    w = _random_llama_weights(cfg, torch.Generator().manual_seed(seed))
    eye = torch.eye(v)
    w["model.embed_tokens.weight"] = eye.clone()
    # RMSNorm turns e_t into sqrt(h) * e_t; scale the lm_head so the margin is `margin`.
    w["lm_head.weight"] = torch.roll(eye, shifts=1, dims=0) * (margin / h**0.5)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.o_proj.weight"].zero_()
        w[p + "mlp.down_proj.weight"].zero_()
    _save(path, cfg, w)
    _write_tokenizer(path, v)
    return path


def _rope_theta(cfg: dict) -> float:
    """transformers 5 keeps rope_theta under rope_parameters; older configs at the top level."""
    return float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))


def _eagle3_config(target_cfg: dict, draft_vocab_size: int, aux_layers: list[int]) -> dict:
    h = target_cfg["hidden_size"]
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "vocab_size": target_cfg["vocab_size"],
        "draft_vocab_size": draft_vocab_size,
        "hidden_size": h,
        "target_hidden_size": h,
        "intermediate_size": 2 * h,
        "num_hidden_layers": 1,
        "num_attention_heads": target_cfg["num_attention_heads"],
        "num_key_value_heads": target_cfg["num_key_value_heads"],
        "head_dim": target_cfg["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": target_cfg["max_position_embeddings"],
        "rms_norm_eps": target_cfg["rms_norm_eps"],
        "rope_theta": _rope_theta(target_cfg),
        "tie_word_embeddings": False,
        "torch_dtype": target_cfg.get("torch_dtype") or target_cfg.get("dtype", "bfloat16"),
        # Written explicitly: vLLM's default (2, L/2, L-3) collides on shallow targets.
        "eagle_aux_hidden_state_layer_ids": list(aux_layers),
    }


def _random_eagle3_weights(cfg: dict, gen: torch.Generator, std: float = 0.05) -> dict[str, torch.Tensor]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q_dim = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_dim = cfg["num_key_value_heads"] * cfg["head_dim"]

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * std

    p = "midlayer."
    return {
        "fc.weight": rand(h, 3 * cfg["target_hidden_size"]),
        p + "hidden_norm.weight": torch.ones(h),
        p + "input_layernorm.weight": torch.ones(h),
        p + "post_attention_layernorm.weight": torch.ones(h),
        p + "self_attn.q_proj.weight": rand(q_dim, 2 * h),
        p + "self_attn.k_proj.weight": rand(kv_dim, 2 * h),
        p + "self_attn.v_proj.weight": rand(kv_dim, 2 * h),
        p + "self_attn.o_proj.weight": rand(h, q_dim),
        p + "mlp.gate_proj.weight": rand(inter, h),
        p + "mlp.up_proj.weight": rand(inter, h),
        p + "mlp.down_proj.weight": rand(h, inter),
        "norm.weight": torch.ones(h),
        "lm_head.weight": rand(cfg["draft_vocab_size"], h) * 20,
    }


def successor_eagle3_head(path: str | os.PathLike, target: str | os.PathLike, scale: float = 4.0,
                          decoy: int | None = None) -> Path:
    """An EAGLE-3 head that drafts t+1, t+2, ... for `successor_llama` (see module doc).

    With `decoy` = d, every draft step ranks t+1+d first and the right token t+1 second: a chain
    drafts only wrong tokens, a tree of top-k >= 2 holds the right path through the second child
    at every level (the head's next hidden state does not depend on the token drafted)."""
    path, target = Path(path), Path(target)
    tcfg = json.loads((target / "config.json").read_text())
    v = h = tcfg["hidden_size"]
    cfg = _eagle3_config(tcfg, v, EAGLE3_AUX_LAYERS)
    w = _random_eagle3_weights(cfg, torch.Generator().manual_seed(1))
    eye = torch.eye(h)
    # Aux states are e_t at each of the 3 layers: fc averages them and scales to `scale`.
    w["fc.weight"] = torch.cat([eye, eye, eye], dim=1) * (scale / 3)
    w["midlayer.self_attn.o_proj.weight"].zero_()
    inter = cfg["intermediate_size"]
    # gate: every unit reads 30/sqrt(h) * sum(x) = 30 for x = sqrt(h) * e_s (post RMSNorm),
    # where silu(30) = 30 to 13 digits.
    gate = torch.zeros(inter, h)
    gate[:h] = 30.0 / h**0.5
    up = torch.zeros(inter, h)
    up[:h] = (torch.roll(eye, shifts=1, dims=0) - eye) / h**0.5  # e_s -> e_(s+1) - e_s
    down = torch.zeros(h, inter)
    down[:, :h] = eye * (scale / 30.0)
    w["midlayer.mlp.gate_proj.weight"] = gate
    w["midlayer.mlp.up_proj.weight"] = up
    w["midlayer.mlp.down_proj.weight"] = down
    w["lm_head.weight"] = torch.roll(eye, shifts=1, dims=0) * (40.0 / h**0.5)
    if decoy is not None:
        w["lm_head.weight"] += torch.roll(eye, shifts=1 + decoy, dims=0) * (44.0 / h**0.5)
    # Its own embedding (the head ignores it: attention output is zero).
    w["embed_tokens.weight"] = torch.randn(v, h, generator=torch.Generator().manual_seed(2))
    return _save(path, cfg, w)


def random_eagle3_head(
    path: str | os.PathLike,
    target: str | os.PathLike,
    draft_vocab_size: int = 64,
    aux_layers: list[int] | None = None,
    seed: int = 3,
) -> Path:
    """A random EAGLE-3 head for any Llama target, with a reduced draft vocabulary.

    d2t[i] = (target id of draft token i) - i, and t2d is a boolean mask over the target vocab,
    the format vLLM's EAGLE-3 loader and the EAGLE/speculators checkpoints use.
    """
    path, target = Path(path), Path(target)
    tcfg = json.loads((target / "config.json").read_text())
    layers = tcfg["num_hidden_layers"]
    aux = aux_layers or sorted({min(2, layers - 1), layers // 2, max(layers - 3, 0)})
    if len(aux) != 3:
        raise ValueError(f"need 3 distinct aux layers for a {layers}-layer target, got {aux}")
    cfg = _eagle3_config(tcfg, draft_vocab_size, aux)
    gen = torch.Generator().manual_seed(seed)
    w = _random_eagle3_weights(cfg, gen)
    draft_to_target = torch.sort(torch.randperm(tcfg["vocab_size"], generator=gen)[:draft_vocab_size]).values
    w["d2t"] = draft_to_target - torch.arange(draft_vocab_size)
    t2d = torch.zeros(tcfg["vocab_size"], dtype=torch.bool)
    t2d[draft_to_target] = True
    w["t2d"] = t2d
    return _save(path, cfg, w)


def build_all(root: str | os.PathLike) -> dict[str, Path]:
    """Build every fixture under `root` (idempotent); return their paths by name."""
    root = Path(root)
    paths = {
        "tiny": root / "tiny-llama",
        "tiny_head": root / "tiny-llama-eagle3-random",
        "successor": root / "successor-llama",
        "successor_head": root / "successor-llama-eagle3",
        "decoy_head": root / "successor-llama-eagle3-decoy",
    }
    if not (paths["tiny"] / "config.json").exists():
        tiny_random_llama(paths["tiny"])
    if not (paths["tiny_head"] / "config.json").exists():
        random_eagle3_head(paths["tiny_head"], paths["tiny"], aux_layers=[0, 1, 2])
    if not (paths["successor"] / "config.json").exists():
        successor_llama(paths["successor"])
    if not (paths["successor_head"] / "config.json").exists():
        successor_eagle3_head(paths["successor_head"], paths["successor"])
    if not (paths["decoy_head"] / "config.json").exists():
        successor_eagle3_head(paths["decoy_head"], paths["successor"], decoy=5)
    return paths
