"""Train the EAGLE-3 head on the feature shards with the training-time test (model.py).

Readable top to bottom: config, initialisation from the target, batching, the loss, the loop.
Everything is seeded; the loop writes a checkpoint every `checkpoint_every` optimizer steps
and resumes from the latest one, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vllm_respsp.draft.data import FeatureSequence
from vllm_respsp.draft.model import Eagle3Head, HeadConfig


@dataclass
class TrainConfig:
    draft_vocab_size: int = 8192
    ttt_steps: int = 5            # draft steps unrolled per position (vLLM drafts 5 in the eval)
    step_weight_decay: float = 0.8  # loss weight of step k is decay**k: deep drafts matter less
    # Curriculum against the "token-only" optimum (issue 3): trained with all 5 steps from the
    # start, the deep steps (which never see the aux states, and whose summed loss weight is
    # 2.4x step 0's) pull the shared layer to a solution that ignores `hidden`, and step 0
    # stalls at bigram accuracy (150-step A/B on 2 shards: held-out step-0 accuracy 0.22 with
    # TTT from step 0, 0.28 with step 0 alone). So the first `single_step_epochs` train step 0
    # only (and cost ~1/3 of a TTT step), then the deep steps join with their weights scaled
    # by `deep_step_weight`.
    single_step_epochs: float = 0.7
    deep_step_weight: float = 0.5
    # Passes over the data. On this 2-core machine the features of the 7.4M tokens take ~50-90
    # min, a step-0 pass ~36 min (4-5 it/s) and a TTT pass ~100 min (~2 it/s); the vLLM
    # evaluation ~10 min. One pass (step 0 alone on its first 0.7, then the training-time test)
    # fitted one session, but the head was under-trained: its held-out accuracy rose at every
    # evaluation to the end. On 1/8 of the data a second pass gained as much as twice the data
    # (vLLM MT-Bench AL 1.313 -> 1.402; 1/4 of the data in one pass: 1.404), so two passes
    # (~2.7 h): longer than a session, which the checkpoints (weights, optimizer, data position,
    # RNG) carry across.
    epochs: int = 2
    # Small batches, many updates: far from convergence, the number of updates is what limits
    # (4096-token batches at lr 1e-3 reached only 24% step-0 accuracy after one epoch).
    tokens_per_batch: int = 1024  # padded tokens per optimizer step
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # The first sequences of the data (the first ShareGPT reply shard) are held out: the same
    # slice for every data fraction and however much data is added later.
    heldout_sequences: int = 128
    # Train on this leading share of the other sequences (the scaling curve: 1/8 .. 1).
    data_fraction: float = 1.0
    checkpoint_every: int = 200
    # Held-out per-step accuracy every this many steps, in the log and on the progress bar. In
    # a single pass over the data (epochs=1) this is also the data-scaling curve: every
    # training token is new when it is seen.
    eval_every: int = 1000
    # The draft layer (attention + MLP) starts from a target layer's weights: on 1/8 of the data
    # vLLM MT-Bench AL 1.361 against 1.313 from random, step-0 accuracy 0.342 vs 0.307.
    init_midlayer_from_target: bool = True
    # Options tried and left off: in a 64-step A/B on 128 sequences, the feature loss gave no
    # gain (offline acceptance 1.150 vs 1.155) and the target's final norm init lost (1.089).
    feature_weight: float = 0.0   # EAGLE-1-style feature loss on the deepest aux state (ttt_loss)
    final_norm_from_target: bool = False  # start the final norm at the target's (logit-lens) weights
    # Distillation: each step's loss is (1 - w) * CE(greedy label) + w * CE(the target's own
    # top-k distribution of that token, renormalised over the draft vocabulary), where the
    # feature shards carry it (data.DataConfig.soft_topk).
    soft_label_weight: float = 0.0
    # Deep steps on this share of each batch's rows (Eagle3Head.unrolled's deep_rows): with 5
    # steps, the training-time test then costs ~2 step-0 passes instead of ~5. In a seeded A/B
    # (4 shards, 1 step-0 epoch + 1 TTT epoch) a quarter of the rows was also better: offline
    # acceptance length 1.381 vs 1.346 with every row, in 204 s instead of 285 s.
    deep_row_fraction: float = 0.25
    seed: int = 0


def recipe_label(train: dict) -> str:
    """How a training config (as a dict) differs from TrainConfig defaults, its data share aside."""
    today = asdict(TrainConfig())
    changed = {k: v for k, v in train.items() if k != "data_fraction" and today.get(k) != v}
    return ", ".join(f"{k}={v}" for k, v in changed.items()) or "TrainConfig defaults"


def init_from_target(head: Eagle3Head, target_path: Path, midlayer: bool = False,
                     norm_scale: float = 0.25) -> None:
    """Start the lm_head from the target's (tied) embedding rows of the draft vocabulary, so
    tokens the target treats alike start with alike logits. The final norm starts at
    `norm_scale` instead of the target's own weights (mean 1.8): a fresh head's output is a
    random direction, and with the target's scale its logits have std ~6, an initial loss of
    ~16 nats per step (measured) instead of ~ln(vocab). With `midlayer` (the recipe's
    default since the 1/8-data ablation; a 32-step A/B had seen no gain) the draft layer starts
    from the target's last aux layer."""
    from safetensors import safe_open

    cfg = head.cfg
    h = cfg.hidden_size
    with safe_open(str(target_path / "model.safetensors"), "pt") as f:
        def get(name):
            return f.get_tensor(name).float()

        with torch.no_grad():
            head.lm_head.weight.copy_(get("model.embed_tokens.weight")[head.draft_to_target])
            head.norm.weight.fill_(norm_scale)
            if not midlayer:
                return
            last = f"model.layers.{cfg.aux_layers[-1]}."
            layer = head.midlayer
            layer.hidden_norm.weight.copy_(get(last + "input_layernorm.weight"))
            layer.post_attention_layernorm.weight.copy_(get(last + "post_attention_layernorm.weight"))
            for proj in ("q_proj", "k_proj", "v_proj"):
                w = getattr(layer.self_attn, proj).weight
                w[:, :h].normal_(0, 0.02)
                w[:, h:].copy_(get(last + f"self_attn.{proj}.weight"))
            layer.self_attn.o_proj.weight.copy_(get(last + "self_attn.o_proj.weight"))
            for proj in ("gate_proj", "up_proj", "down_proj"):
                getattr(layer.mlp, proj).weight.copy_(get(last + f"mlp.{proj}.weight"))
            head.fc.weight.normal_(0, 0.01)
            head.fc.weight[:, 2 * h:] += torch.eye(h)


def make_batches(lengths: list[int], tokens_per_batch: int, rng: random.Random) -> list[list[int]]:
    """Group sequence indices of similar length (little padding) into batches of at most
    `tokens_per_batch` padded tokens; batch order shuffled by `rng`."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > tokens_per_batch:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


class Batch(NamedTuple):
    ids: torch.Tensor            # [B, T] int64, zero-padded
    aux: torch.Tensor            # [B, T, 3h] bf16 (under autocast fc reads it as is)
    lengths: torch.Tensor        # [B]
    reply_starts: torch.Tensor   # [B]
    soft_ids: torch.Tensor | None = None   # [B, T, k] target ids of the target's top-k
    soft_logp: torch.Tensor | None = None  # [B, T, k] their log-probs (-inf in the padding)


def collate(sequences: list[FeatureSequence]) -> Batch:
    lengths = torch.tensor([len(s.ids) for s in sequences])
    B, T = len(sequences), int(lengths.max())
    ids = torch.zeros(B, T, dtype=torch.long)
    aux = torch.zeros(B, T, sequences[0].aux.shape[-1], dtype=torch.bfloat16)
    soft = all(s.soft_ids is not None for s in sequences)
    soft_ids = soft_logp = None
    if soft:
        k = sequences[0].soft_ids.shape[-1]
        soft_ids = torch.zeros(B, T, k, dtype=torch.long)
        soft_logp = torch.full((B, T, k), float("-inf"))
    for b, s in enumerate(sequences):
        n = len(s.ids)
        ids[b, :n] = s.ids
        aux[b, :n] = s.aux
        if soft:
            soft_ids[b, :n] = s.soft_ids.long()
            soft_logp[b, :n] = s.soft_logp.float()
    reply_starts = torch.tensor([s.reply_start for s in sequences])
    return Batch(ids, aux, lengths, reply_starts, soft_ids, soft_logp)


def soft_label_ce(head: Eagle3Head, logits: torch.Tensor, soft_ids: torch.Tensor,
                  soft_logp: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the draft logits [N, V_draft] against the target's top-k distribution
    ([N, k] target ids and log-probs), renormalised over the tokens in the draft vocabulary."""
    draft_ids = head.target_to_draft[soft_ids]
    in_vocab = draft_ids >= 0
    # nan_to_num: a row whose top-k lies wholly outside the draft vocabulary adds no loss.
    p = soft_logp.masked_fill(~in_vocab, float("-inf")).softmax(-1).nan_to_num(0.0)
    log_q = logits.log_softmax(-1).gather(-1, draft_ids.clamp(min=0))
    return -(p * log_q).masked_fill(~in_vocab, 0.0).sum(-1).mean()


def unit_rms(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def ttt_loss(head: Eagle3Head, batch: Batch, steps: int, decay: float, feature_weight: float = 0.0,
             deep_weight: float = 1.0, soft_weight: float = 0.0, deep_row_fraction: float = 1.0):
    """Weighted cross-entropy over the unrolled steps; per-step (correct, counted) for accuracy.
    The lm_head only runs on rows whose label counts (reply tokens in the draft vocab).

    With `feature_weight` > 0, an EAGLE-1-style feature loss is added: step k's output at row
    i should point where the target's deepest aux state at position i+k+1 points (both
    RMS-normalised; smooth L1). That state is what the target itself would use to predict the
    label x[i+k+2] (its logit lens already picks the right token ~50% of the time), and a
    576-dim target per token is a much denser signal than one label when data is this scarce.

    With `soft_weight` > 0 the label's CE is mixed with the CE against the target's own
    distribution of that token (`soft_label_ce`): step k at row i predicts x[i+k+2], which the
    target drew from its distribution at position i+k+1.

    With `deep_row_fraction` < 1 the deep steps run on a random subset of rows (the same for
    the whole batch; `Eagle3Head.unrolled`'s `deep_rows`); step 0 always uses every row."""
    ids, aux, lengths, reply_starts = batch.ids, batch.aux, batch.lengths, batch.reply_starts
    if soft_weight and batch.soft_ids is None:
        raise ValueError("soft_label_weight > 0 needs feature shards with soft labels (DataConfig.soft_topk)")
    T = ids.shape[1]
    deep_rows = None
    if steps > 1 and deep_row_fraction < 1.0:
        deep_rows = torch.randperm(T)[:max(1, math.ceil(deep_row_fraction * T))].sort().values
    outputs = head.unrolled(ids, aux, lengths, steps, deep_rows)
    labels = head.labels(ids, lengths, reply_starts, steps)
    h = head.cfg.hidden_size

    def at_step_rows(x: torch.Tensor, k: int) -> torch.Tensor:
        return x if k == 0 or deep_rows is None else x[:, deep_rows]

    total, stats = 0.0, []
    for k, (out, lab) in enumerate(zip(outputs, labels)):
        lab = at_step_rows(lab, k)
        keep = lab >= 0
        logits = head.logits(out[keep]).float()
        target = lab[keep]
        if target.numel():
            weight = decay ** k * (deep_weight if k else 1.0)
            ce = F.cross_entropy(logits, target)
            if soft_weight:
                shift = (0, 0, 0, k + 1)
                soft_ids = at_step_rows(F.pad(batch.soft_ids[:, k + 1:], shift), k)[keep]
                soft_logp = at_step_rows(F.pad(batch.soft_logp[:, k + 1:], shift), k)[keep]
                ce = (1 - soft_weight) * ce + soft_weight * soft_label_ce(head, logits, soft_ids, soft_logp)
            total = total + weight * ce
            if feature_weight:
                deepest_next = at_step_rows(F.pad(aux[:, k + 1:, -h:], (0, 0, 0, k + 1)), k)[keep]
                total = total + decay ** k * feature_weight * F.smooth_l1_loss(
                    unit_rms(out[keep]), unit_rms(deepest_next))
        stats.append(((logits.argmax(-1) == target).sum().item(), target.numel()))
    return total, stats


@torch.no_grad()
def heldout_accuracy(head: Eagle3Head, sequences, steps: int, tokens_per_batch: int) -> list[float]:
    """Top-1 accuracy of each unrolled step on the reply labels of `sequences` (teacher-forced
    inputs, as in training)."""
    was_training = head.training
    head.eval()
    counts = [[0, 0] for _ in range(steps)]
    for batch_ids in make_batches([len(s.ids) for s in sequences], tokens_per_batch, random.Random(0)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, stats = ttt_loss(head, collate([sequences[i] for i in batch_ids]), steps, 1.0)
        for c, (right, n) in zip(counts, stats):
            c[0] += right
            c[1] += n
    head.train(was_training)
    return [right / n if n else 0.0 for right, n in counts]


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def sequences_read(total: int, cfg: TrainConfig) -> int:
    """How many of `total` sequences (in training order) a run reads: the held-out slice, then
    the leading `data_fraction` of the rest."""
    return cfg.heldout_sequences + max(1, round(cfg.data_fraction * (total - cfg.heldout_sequences)))


def split_sequences(sequences: list[FeatureSequence], cfg: TrainConfig, total: int | None = None):
    """(training sequences, held-out sequences) of a run on `total` sequences (default: all of
    `sequences`, which may hold just the leading ones the run reads)."""
    read = sequences_read(len(sequences) if total is None else total, cfg)
    if read > len(sequences):
        raise ValueError(f"data_fraction={cfg.data_fraction} of {total} sequences reads {read}, "
                         f"but only {len(sequences)} were loaded")
    return sequences[cfg.heldout_sequences:read], sequences[:cfg.heldout_sequences]


def train(sequences: list[FeatureSequence], target_path: Path, out_dir: Path, cfg: TrainConfig,
          draft_to_target: torch.Tensor, aux_layers, total_sequences: int | None = None) -> Eagle3Head:
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    head = initial_head(target_path, cfg, draft_to_target, aux_layers)
    train_seqs, heldout_seqs = split_sequences(sequences, cfg, total_sequences)
    batches_per_epoch = len(make_batches([len(s[0]) for s in train_seqs], cfg.tokens_per_batch, random.Random(0)))
    total_steps = cfg.epochs * batches_per_epoch
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.pt"
    step, seen = resume(ckpt_path, cfg, head, optimizer, rng)  # seen: training tokens so far
    log = reopen_log(out_dir / "train_log.jsonl", step)
    bar = tqdm(total=total_steps, initial=step, desc="train")
    start, held = time.perf_counter(), "-"
    while step < total_steps:
        epoch_rng = random.Random(cfg.seed * 1000 + step // batches_per_epoch)
        batches = make_batches([len(s[0]) for s in train_seqs], cfg.tokens_per_batch, epoch_rng)
        for batch_ids in batches[step % batches_per_epoch:]:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, cfg)
            steps = 1 if step < int(cfg.single_step_epochs * batches_per_epoch) else cfg.ttt_steps
            batch = collate([train_seqs[i] for i in batch_ids])
            seen += int(batch.lengths.sum())
            loss, acc = optimizer_step(head, optimizer, batch, steps, cfg)
            step += 1
            record = {"step": step, "tokens": seen, "loss": loss, "acc": acc, "seconds": time.perf_counter() - start}
            if step % cfg.eval_every == 0 or step == total_steps:
                record["heldout_acc"] = heldout_accuracy(head, heldout_seqs, cfg.ttt_steps, cfg.tokens_per_batch)
                held = "/".join(f"{a:.2f}" for a in record["heldout_acc"])
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", acc="/".join(f"{a:.2f}" for a in acc), heldout=held)
            log.write(json.dumps(record) + "\n")
            if step % cfg.checkpoint_every == 0 or step == total_steps:
                log.flush()  # a kill -9 after the checkpoint must not lose the steps it covers
                torch.save({"config": asdict(cfg), "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                            "step": step, "tokens": seen, "rng": rng.getstate(),
                            "torch_rng": torch.get_rng_state()},
                           ckpt_path)
            if step >= total_steps:
                break
    bar.close()
    log.close()
    return head


def initial_head(target_path: Path, cfg: TrainConfig, draft_to_target: torch.Tensor, aux_layers) -> Eagle3Head:
    """A head over the target's embedding, initialised from the target (`init_from_target`)."""
    from vllm_respsp.draft.model import target_embedding

    target_cfg = json.loads((target_path / "config.json").read_text())
    head_cfg = HeadConfig.from_target(target_cfg, cfg.draft_vocab_size, aux_layers)
    head = Eagle3Head(head_cfg, target_embedding(target_path), draft_to_target)
    init_from_target(head, target_path, cfg.init_midlayer_from_target)
    if cfg.final_norm_from_target:
        from safetensors import safe_open

        with safe_open(str(target_path / "model.safetensors"), "pt") as f, torch.no_grad():
            head.norm.weight.copy_(f.get_tensor("model.norm.weight").float())
    return head


def resume(ckpt_path: Path, cfg: TrainConfig, head: Eagle3Head, optimizer, rng: random.Random) -> tuple[int, int]:
    """Load a checkpoint of this very config (head, optimizer, RNGs) if there is one; returns its
    (step, training tokens seen), (0, 0) when starting afresh."""
    if not ckpt_path.exists():
        return 0, 0
    ckpt = torch.load(ckpt_path, weights_only=False)
    if ckpt["config"] != asdict(cfg):
        return 0, 0
    head.load_state_dict(ckpt["head"])
    optimizer.load_state_dict(ckpt["optimizer"])
    rng.setstate(ckpt["rng"])
    torch.set_rng_state(ckpt["torch_rng"])
    return ckpt["step"], ckpt.get("tokens", 0)


def reopen_log(log_path: Path, step: int):
    """The training log, open for appending after `step`: lines a killed run wrote after its last
    checkpoint are dropped (those steps are trained again)."""
    if log_path.exists():
        kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= step]
        log_path.write_text("".join(line + "\n" for line in kept))
    return open(log_path, "a")


def optimizer_step(head: Eagle3Head, optimizer, batch: Batch, steps: int,
                   cfg: TrainConfig) -> tuple[float, list[float]]:
    """One step of `steps` unrolled draft steps (bf16 autocast); returns the loss and each draft
    step's top-1 accuracy on the batch."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = ttt_loss(head, batch, steps, cfg.step_weight_decay, cfg.feature_weight, cfg.deep_step_weight,
                               cfg.soft_label_weight, cfg.deep_row_fraction)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss.item(), [c / n if n else 0.0 for c, n in stats]


@torch.no_grad()
def offline_acceptance(head: Eagle3Head, sequences, chain: int = 5) -> dict:
    """Simulate greedy chain drafting of depth `chain` over reply tokens of held-out sequences.

    Rounds start at the first reply row; a round at row i accepts n = the number of leading
    steps whose argmax equals the true next tokens (out-of-vocab labels count as misses) and
    moves to row i + n + 1 - the walk vLLM's verification makes under greedy decoding. Returns
    the mean acceptance length (1 + accepted / rounds, vLLM's metric) and per-position rates.
    """
    rounds, accepted_per_pos = 0, [0] * chain
    for seq in sequences:
        ids, reply_start = seq.ids, seq.reply_start
        batch = collate([FeatureSequence(ids, seq.aux, reply_start)])
        outputs = head.unrolled(batch.ids, batch.aux, batch.lengths, chain)
        drafts = [head.draft_to_target[head.logits(o[0]).argmax(-1)] for o in outputs]  # [T] each
        T = len(ids)
        i = max(reply_start - 1, 0)  # first draft round: hidden of the last prompt token + token 1
        while i + 2 < T:
            n = 0
            while n < chain and i + n + 2 < T and drafts[n][i] == ids[i + n + 2]:
                accepted_per_pos[n] += 1
                n += 1
            rounds += 1
            i += n + 1
    accepted = sum(accepted_per_pos)
    return {"acceptance_length": 1 + accepted / max(rounds, 1), "rounds": rounds,
            "per_position_rate": [a / max(rounds, 1) for a in accepted_per_pos]}
