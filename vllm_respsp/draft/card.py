"""MODEL_CARD.md for the exported head, written from the pipeline's measured summary."""

from __future__ import annotations

import json
from pathlib import Path

DECISIONS = """\
## Decisions

- **Plain PyTorch, not `speculators`.** speculators 0.9.0 exists on PyPI and was inspected
  (`pip download --no-deps`, ~3 minutes): its trainer runs the draft attention through
  `torch.nn.attention.flex_attention` ("simple_flex_attention" is the only supported value),
  sets up `torch.distributed` and assumes CUDA devices, generates data through a vLLM server
  with a hidden-state connector, and pulls in datasets/openai/torchvision/torchaudio and
  hs-connectors. None of that clearly works on this 2-core CPU box within the time budget, so
  the head, the training-time test and the data pipeline are ~700 lines of plain PyTorch here.
- **Greedy replies.** The head is evaluated under greedy verification, where a draft token is
  accepted iff it equals the target's argmax; with greedy replies the next token in the data
  is exactly that argmax, so labels are free and exact (no target logits are stored).
- **Training-time test with vLLM's exact drafting pattern.** Step k at row i reads token
  x[i+k+1] and its own step-(k-1) output, uses RoPE position i+k (vLLM advances the draft
  position each step), and attends to step-0 keys at j <= i plus its own keys of steps 1..k.
  `tests/test_draft_units.py` checks this against step-by-step drafting with a KV list.
- **Loss only on reply tokens**, but prompt positions are kept as attention context (vLLM's
  draft prefill covers the whole context). Out-of-draft-vocab labels are ignored in the loss
  and count as misses in the offline estimate.
- **Initialisation from the target**: lm_head = the target's (tied) embedding rows of the
  draft vocabulary, final norm = the target's; see `train.init_from_target`.
- **No embed_tokens in the file**: vLLM shares the target's embedding.
"""


def fmt_rates(rates: list[float]) -> str:
    return ", ".join(f"{r:.3f}" for r in rates)


def write_model_card(out: Path, summary: dict) -> Path:
    data, train, offline = summary["data"], summary["train"], summary["offline_estimate"]
    times = summary.get("stage_seconds", {})
    lines = [
        "# smollm2-135m-eagle3: EAGLE-3 draft head for SmolLM2-135M-Instruct (testbed target)",
        "",
        "One Llama decoder layer over [embedding, fc(aux states of target layers "
        f"{list(data['aux_layers'])})], draft vocabulary {train['draft_vocab_size']} tokens "
        "(d2t/t2d maps), target embedding shared (not stored). Loads in vLLM 0.32:",
        "",
        "```python",
        "from vllm_respsp.draft import shipped_head_path",
        'speculative_config = {"method": "eagle3", "model": str(shipped_head_path()), "num_speculative_tokens": 5}',
        "```",
        "",
        "Reproduce (data -> train -> export -> evaluate, this card included): "
        "`python -m vllm_respsp.draft` (= `make draft-head`). Evaluation alone: "
        "`python -m vllm_respsp.draft.evaluate`.",
        "",
        "## Results (vLLM, greedy, 256 new tokens, chain of 5 drafts)",
        "",
    ]
    ev = summary.get("vllm_eval")
    if ev:
        lines += [
            "| set | prompts | acceptance length (vLLM: 1 + accepted/drafts) | per-position acceptance rate (1..5) | tok/s |",
            "|---|---|---|---|---|",
        ]
        for key, name in (("mt_bench", "MT-Bench (first turns)"), ("humaneval", "HumanEval")):
            r = ev[key]
            lines.append(f"| {name} | {r['prompts']} | **{r['acceptance_length']:.3f}** | "
                         f"{fmt_rates(r['per_position_rate'])} | {r['tokens_per_s']:.0f} |")
        ident = ev["identity"]
        lines += [
            "",
            f"No-speculation MT-Bench run: {ev['mt_bench_no_spec']['tokens_per_s']:.0f} tok/s (CPU, shared "
            "2-core machine: speeds are noisy and not the point here).",
            "",
            f"Identity check (greedy, {ident['prompts']} MT-Bench prompts, with vs without the head): "
            + ("**token-for-token identical**." if ident["identical"] else
               f"**MISMATCH** on prompts {ident['mismatched_prompts']}."),
        ]
    else:
        lines.append("Not evaluated in vLLM in this run (--skip-eval).")
    lines += [
        "",
        f"Offline estimate (this module's own simulation of greedy chain-5 drafting on "
        f"{train['heldout_sequences']} held-out training-distribution sequences, {offline['rounds']} rounds): "
        f"acceptance length {offline['acceptance_length']:.3f}, per position {fmt_rates(offline['per_position_rate'])}.",
        "",
        "## Data",
        "",
        f"- {data['sequences']} ShareGPT prompts from the `sharegpt-train` split (seeded shuffle, seed "
        f"{data['seed']}; rendered prompt <= {data['max_prompt_tokens']} tokens), never MT-Bench, HumanEval, "
        "GSM8K or the held-out ShareGPT slice.",
        f"- Replies regenerated by the target in vLLM, greedy, <= {data['max_new_tokens']} new tokens.",
        f"- {data['tokens']} tokens (prompt + reply) with the target's aux hidden states (bf16, HF forward "
        "with pre-hooks on the aux layers = vLLM's aux states: the residual stream entering each layer).",
        f"- Draft vocabulary covers {data['draft_vocab_coverage']:.2%} of reply tokens.",
        "",
        "## Training",
        "",
        "```json",
        json.dumps(train, indent=1),
        "```",
        "",
        f"Last logged step: `{summary['train_log_tail']}` (acc = per-step top-1 accuracy on the batch).",
        "",
        "## Wall times on this machine (2 CPU cores, shared; seconds)",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in times.items()],
        "",
        DECISIONS,
    ]
    path = out / "MODEL_CARD.md"
    path.write_text("\n".join(lines) + "\n")
    return path
