"""Training data for the EAGLE-3 head: the target's greedy replies (replies.py) and the
target's hidden states on them (this module).

`extract_features` runs one HF transformers forward per sequence (prompt + reply) and records
the residual stream entering the aux layers (what vLLM hands the head: `aux_hidden_states`),
for every position, in bf16. Prompt positions are kept because the head attends over them at
inference too (vLLM's draft prefill runs over the whole context); the loss only uses reply
positions (`reply_start`). With `soft_topk` > 0 the whole target runs and its `soft_topk` most
likely next tokens at every position are kept with their log-probabilities (soft labels for
distillation; off by default, see DataConfig).

Features are recomputed from the committed replies (about 1,100 tokens/s on two cores), never
committed: at 3 x 576 bf16 values per token they are ~3.5 kB a token, gigabytes in all. One
features shard per reply shard, `features/<source>/shard-XXXXX.pt` (torch.save, loaded with
mmap so that the whole set need not fit in memory), written under a temporary name and renamed:
a re-run skips finished shards and redoes an interrupted one. A shard holds `input_ids` int32
[N], `aux` bf16 [N, 3 * hidden] (layers concatenated in `aux_layers` order, as vLLM's fc input),
`seq_starts` int64 [S + 1], `reply_starts` int64 [S] (offset of the first reply token inside its
sequence), and, when `soft_topk` > 0, `soft_ids` int32 [N, k] and `soft_logp` fp16 [N, k].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from vllm_respsp import envs
from vllm_respsp.draft.replies import ReplyConfig, read_gz_json, reply_shards


@dataclass
class DataConfig:
    # Prompt sources and how many of each source's planned prompts to use (None: all). Order is
    # the order replies are generated in when several sources miss shards (round robin).
    sources: dict[str, int | None] = field(default_factory=lambda: {
        "sharegpt-train": None, "openai-evals": 4096, "compute-eval": None})
    replies: ReplyConfig = field(default_factory=ReplyConfig)
    aux_layers: tuple[int, int, int] = (2, 15, 27)
    # Soft labels cost ~35% more feature time (the whole target runs) and, in two seeded A/Bs
    # (step-0 training on 4 shards, 1 and 3 epochs), matched the greedy labels within 0.005
    # held-out accuracy, so they are off by default (train.TrainConfig.soft_label_weight).
    soft_topk: int = 0  # 0: no soft labels (the target then runs only up to the last aux layer)


def default_work_dir() -> Path:
    return envs.draft_work_dir()


def shard_path(folder: Path, index: int, suffix: str) -> Path:
    return folder / f"shard-{index:05d}{suffix}"


def write_atomically(path: Path, write) -> None:
    """Call write(tmp_path) then rename: a half-written shard never looks finished."""
    tmp = path.with_name(".tmp-" + path.name)
    write(tmp)
    tmp.rename(path)


def pending_shards(folder: Path, num_shards: int, suffix: str) -> list[int]:
    return [i for i in range(num_shards) if not shard_path(folder, i, suffix).exists()]


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


def sequence_features(model, recorder: AuxRecorder, ids: torch.Tensor, cfg: DataConfig) -> dict:
    with torch.inference_mode():  # the pre-hooks record the aux states
        if cfg.soft_topk:
            top, logp = top_next_tokens(model, ids, cfg.soft_topk)
        else:
            model.model(input_ids=ids[None])
    out = {"aux": torch.cat([recorder.states[k][0] for k in cfg.aux_layers], dim=-1).to(torch.bfloat16)}
    if cfg.soft_topk:
        out |= {"soft_ids": top, "soft_logp": logp}
    return out


def features_shard(model, recorder: AuxRecorder, rows: list[dict], cfg: DataConfig, bar) -> dict:
    parts: dict[str, list[torch.Tensor]] = {"input_ids": [], "aux": [], "soft_ids": [], "soft_logp": []}
    starts, reply_starts = [0], []
    for row in rows:
        ids = torch.tensor(row["prompt_ids"] + row["reply_ids"])
        for name, value in sequence_features(model, recorder, ids, cfg).items():
            parts[name].append(value)
        parts["input_ids"].append(ids.to(torch.int32))
        starts.append(starts[-1] + len(ids))
        reply_starts.append(len(row["prompt_ids"]))
        bar.update(len(ids))
    tensors = {name: torch.cat(values) for name, values in parts.items() if values}
    return tensors | {"seq_starts": torch.tensor(starts), "reply_starts": torch.tensor(reply_starts)}


def features_dir(work: Path) -> Path:
    return work / "features"


def count_sequences(replies: Path, cfg: DataConfig) -> int:
    """How many sequences (prompt + reply) every finished reply shard holds."""
    return sum(len(read_gz_json(path)) for _, _, path in reply_shards(replies, cfg.sources, cfg.replies))


def leading_shards(replies: Path, cfg: DataConfig, sequences: int) -> list[tuple[str, int, Path]]:
    """The reply shards, in training order, that hold the first `sequences` sequences: all a
    run on a data fraction reads, so only their features need computing (1/8 of the data takes
    ~12 minutes here instead of ~90)."""
    shards, held = [], 0
    for shard in reply_shards(replies, cfg.sources, cfg.replies):
        if held >= sequences:
            break
        shards.append(shard)
        held += len(read_gz_json(shard[2]))
    return shards


def extract_features(work: Path, cfg: DataConfig, model_path: Path, shards: list[tuple[str, int, Path]]) -> Path:
    """Stage 2: a features shard for each of the reply `shards` (format in the module doc).
    Progress in tokens, with an ETA over every shard still to do."""
    out = features_dir(work)
    todo = [(source, index, path) for source, index, path in shards
            if not shard_path(out / source, index, ".pt").exists()]
    if not todo:
        return out
    rows_of = {(source, index): read_gz_json(path) for source, index, path in todo}
    total = sum(len(r["prompt_ids"]) + len(r["reply_ids"]) for rows in rows_of.values() for r in rows)
    model = load_truncated_target(model_path, None if cfg.soft_topk else max(cfg.aux_layers))
    recorder = AuxRecorder(model, cfg.aux_layers)
    bar = tqdm(total=total, desc=f"features ({len(todo)} shards)", unit="tok", unit_scale=True)
    for source, index, _ in todo:
        tensors = features_shard(model, recorder, rows_of[(source, index)], cfg, bar)
        (out / source).mkdir(parents=True, exist_ok=True)
        write_atomically(shard_path(out / source, index, ".pt"), lambda p, t=tensors: torch.save(t, p))
    bar.close()
    return out


def load_feature_shards(folder: Path, shards: list[tuple[str, int, Path]]) -> list[dict[str, torch.Tensor]]:
    """The features of each of the reply `shards`, memory-mapped, in order."""
    loaded = []
    for source, index, _ in shards:
        path = shard_path(folder / source, index, ".pt")
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run the features stage first")
        loaded.append(torch.load(path, mmap=True, weights_only=True))
    return loaded


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


def reply_token_counts(replies: Path, cfg: DataConfig, vocab_size: int) -> torch.Tensor:
    """How often each target token occurs in the replies (for the draft vocab)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for _, _, path in reply_shards(replies, cfg.sources, cfg.replies):
        for row in read_gz_json(path):
            counts += torch.bincount(torch.tensor(row["reply_ids"], dtype=torch.long), minlength=vocab_size)
    return counts
