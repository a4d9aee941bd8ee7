"""Training data for the EAGLE-3 head: target replies to ShareGPT prompts, and the target's
hidden states on them.

Two stages, each writing numbered shards under the work dir (default
$VLLM_RESPSP_CACHE/draft-work); a shard is written to a temporary name and renamed when
complete, so a re-run skips finished shards and redoes an interrupted one.

1. `generate_replies`: the target (through vLLM) answers `num_prompts` ShareGPT-train prompts,
   greedily, up to `max_new_tokens`. Greedy, because the head is evaluated (and mostly used)
   under greedy verification, where a draft token is accepted exactly when it equals the
   target's argmax: with greedy replies the next token of the sequence IS that argmax, so the
   training label is free and exact (no target logits to store). Only prompts from
   "sharegpt-train" are used (MT-Bench, HumanEval, GSM8K and the held-out ShareGPT slice never).
   Prompts whose chat-rendered length exceeds `max_prompt_tokens` are skipped, to bound the
   cost of stage 2.
2. `extract_features`: one HF transformers forward per sequence (prompt + reply) records the
   residual stream entering the aux layers (what vLLM hands the head: `aux_hidden_states`),
   for every position, in bf16. Prompt positions are kept because the head attends over them
   at inference too (vLLM's draft prefill runs over the whole context); the loss only uses
   reply positions (`reply_start`). With `soft_topk` > 0 the whole target runs and its
   `soft_topk` most likely next tokens at every position are kept with their log-probabilities
   (soft labels for distillation; off by default, see DataConfig).

Features shard format (safetensors): `input_ids` int32 [N], `aux` bf16 [N, 3 * hidden]
(layers concatenated in `aux_layers` order, as vLLM's fc input), `seq_starts` int64 [S + 1]
(offsets of each sequence in the packed arrays), `reply_starts` int64 [S] (offset of the first
reply token inside its sequence), and, when `soft_topk` > 0, `soft_ids` int32 [N, k] and
`soft_logp` fp16 [N, k] (the target's top-k distribution of the token after each position).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from vllm_respsp.testbed.model import cache_dir


@dataclass
class DataConfig:
    num_prompts: int = 3072
    prompts_per_shard: int = 128
    max_prompt_tokens: int = 256
    max_new_tokens: int = 256
    aux_layers: tuple[int, int, int] = (2, 15, 27)
    # Soft labels cost ~35% more feature time (the whole target runs) and, in two seeded A/Bs
    # (step-0 training on 4 shards, 1 and 3 epochs), matched the greedy labels within 0.005
    # held-out accuracy, so they are off by default (train.TrainConfig.soft_label_weight).
    soft_topk: int = 0  # 0: no soft labels (the target then runs only up to the last aux layer)
    seed: int = 0


def default_work_dir() -> Path:
    return Path(os.environ.get("VLLM_RESPSP_DRAFT_WORK") or cache_dir() / "draft-work")


def shard_path(folder: Path, index: int, suffix: str) -> Path:
    return folder / f"shard-{index:05d}{suffix}"


def write_atomically(path: Path, write) -> None:
    """Call write(tmp_path) then rename: a half-written shard never looks finished."""
    tmp = path.with_name(".tmp-" + path.name)
    write(tmp)
    tmp.rename(path)


def pending_shards(folder: Path, num_shards: int, suffix: str) -> list[int]:
    return [i for i in range(num_shards) if not shard_path(folder, i, suffix).exists()]


def select_prompts(tokenizer, cfg: DataConfig) -> list[tuple[str, list[int]]]:
    """(id, prompt token ids) for the first `num_prompts` short-enough train prompts, in a
    seeded shuffle of ShareGPT-train (never the held-out slice nor any benchmark)."""
    from vllm_respsp.testbed.prompts import load_prompts, render

    prompts = load_prompts("sharegpt-train")
    random.Random(cfg.seed).shuffle(prompts)
    chosen = []
    for prompt in prompts:
        # Render one at a time: tokenizing all 17k prompts would cost minutes.
        ids = tokenizer(render([prompt], tokenizer)[0], add_special_tokens=False)["input_ids"]
        if 8 <= len(ids) <= cfg.max_prompt_tokens:
            chosen.append((prompt.id, ids))
        if len(chosen) == cfg.num_prompts:
            break
    return chosen


def generate_replies(work: Path, cfg: DataConfig, model_path: Path) -> Path:
    """Stage 1: replies/shard-XXXXX.json = [{id, prompt_ids, reply_ids}, ...]."""
    from transformers import AutoTokenizer

    out = work / "replies"
    out.mkdir(parents=True, exist_ok=True)
    num_shards = (cfg.num_prompts + cfg.prompts_per_shard - 1) // cfg.prompts_per_shard
    todo = pending_shards(out, num_shards, ".json")
    if not todo:
        return out
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    prompts = select_prompts(tokenizer, cfg)

    from vllm_respsp.testbed.engine_run import generate, make_llm, prepare_cpu_env

    prepare_cpu_env(kv_cache_gib=4)
    llm = make_llm(str(model_path), max_model_len=cfg.max_prompt_tokens + cfg.max_new_tokens,
                   max_num_seqs=cfg.prompts_per_shard)
    sampling = {"temperature": 0.0, "max_tokens": cfg.max_new_tokens}
    for index in tqdm(todo, desc="replies (shards)"):
        batch = prompts[index * cfg.prompts_per_shard:(index + 1) * cfg.prompts_per_shard]
        start = time.perf_counter()
        result = generate(llm, [ids for _, ids in batch], sampling)
        rows = [{"id": pid, "prompt_ids": ids, "reply_ids": reply}
                for (pid, ids), reply in zip(batch, result.token_ids)]
        write_atomically(shard_path(out, index, ".json"), lambda p: p.write_text(json.dumps(rows)))
        tqdm.write(f"shard {index}: {result.output_tokens} tokens in {time.perf_counter() - start:.0f} s")
    del llm  # shuts the engine core down before the feature stage loads the model again
    return out


class AuxRecorder:
    """Forward pre-hooks that keep the residual stream entering each aux layer (vLLM's aux
    hidden state for layer k; HF's `hidden_states[k]`), without trusting how a given
    transformers version post-processes `output_hidden_states`."""

    def __init__(self, model, aux_layers):
        self.states: dict[int, torch.Tensor] = {}
        self.handles = [model.model.layers[k].register_forward_pre_hook(self._hook(k), with_kwargs=True)
                        for k in aux_layers]

    def _hook(self, k):
        def hook(module, args, kwargs):
            self.states[k] = args[0] if args else kwargs["hidden_states"]
        return hook


def load_truncated_target(model_path: Path, last_layer: int | None):
    """The target in bf16 with only the layers up to `last_layer` (later ones are never needed),
    or whole when `last_layer` is None."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.bfloat16)
    if last_layer is not None:
        model.model.layers = model.model.layers[:last_layer + 1]
    return model.eval()


def top_next_tokens(model, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole target's k most likely next tokens at every position and their log-probs
    (fp32 softmax over the full vocabulary), as ([T, k] int32, [T, k] fp16)."""
    logits = model(input_ids=ids[None]).logits[0].float()
    logp, top = logits.log_softmax(-1).topk(k, dim=-1)
    return top.to(torch.int32), logp.to(torch.float16)


def extract_features(work: Path, cfg: DataConfig, model_path: Path) -> Path:
    """Stage 2: features/shard-XXXXX.safetensors (format in the module doc)."""
    replies, out = work / "replies", work / "features"
    out.mkdir(parents=True, exist_ok=True)
    num_shards = len(sorted(replies.glob("shard-*.json")))
    todo = pending_shards(out, num_shards, ".safetensors")
    if not todo:
        return out
    model = load_truncated_target(model_path, None if cfg.soft_topk else max(cfg.aux_layers))
    recorder = AuxRecorder(model, cfg.aux_layers)
    for index in tqdm(todo, desc="features (shards)"):
        rows = json.loads(shard_path(replies, index, ".json").read_text())
        ids_list, aux_list, starts, reply_starts, soft_ids, soft_logp = [], [], [0], [], [], []
        for row in tqdm(rows, desc=f"shard {index}", leave=False):
            ids = torch.tensor(row["prompt_ids"] + row["reply_ids"])
            with torch.inference_mode():  # the pre-hooks record the aux states
                if cfg.soft_topk:
                    top, logp = top_next_tokens(model, ids, cfg.soft_topk)
                    soft_ids.append(top)
                    soft_logp.append(logp)
                else:
                    model.model(input_ids=ids[None])
            aux_list.append(torch.cat([recorder.states[k][0] for k in cfg.aux_layers], dim=-1))
            ids_list.append(ids.to(torch.int32))
            starts.append(starts[-1] + len(ids))
            reply_starts.append(len(row["prompt_ids"]))
        tensors = {"input_ids": torch.cat(ids_list), "aux": torch.cat(aux_list).to(torch.bfloat16),
                   "seq_starts": torch.tensor(starts), "reply_starts": torch.tensor(reply_starts)}
        if cfg.soft_topk:
            tensors |= {"soft_ids": torch.cat(soft_ids), "soft_logp": torch.cat(soft_logp)}
        write_atomically(shard_path(out, index, ".safetensors"), lambda p: save_file(tensors, str(p)))
    return out


def load_feature_shards(folder: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(p)) for p in sorted(folder.glob("shard-*.safetensors"))]


class FeatureSequence(NamedTuple):
    """One stored sequence: input_ids [T] int64, aux [T, 3h] bf16, the offset of its first
    reply token, and the target's top-k next tokens / log-probs [T, k] when stored."""
    ids: torch.Tensor
    aux: torch.Tensor
    reply_start: int
    soft_ids: torch.Tensor | None = None
    soft_logp: torch.Tensor | None = None


def iter_sequences(shards: list[dict[str, torch.Tensor]]):
    """Every stored sequence, as a FeatureSequence."""
    for shard in shards:
        starts = shard["seq_starts"].tolist()
        soft = "soft_ids" in shard
        for s, reply_start in enumerate(shard["reply_starts"].tolist()):
            a, b = starts[s], starts[s + 1]
            yield FeatureSequence(shard["input_ids"][a:b].long(), shard["aux"][a:b], reply_start,
                                  shard["soft_ids"][a:b] if soft else None,
                                  shard["soft_logp"][a:b] if soft else None)


def reply_token_counts(replies: Path, vocab_size: int) -> torch.Tensor:
    """How often each target token occurs in the regenerated replies (for the draft vocab)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for path in sorted(replies.glob("shard-*.json")):
        for row in json.loads(path.read_text()):
            counts += torch.bincount(torch.tensor(row["reply_ids"], dtype=torch.long), minlength=vocab_size)
    return counts
