"""Evaluate an EAGLE-3 head inside vLLM on the testbed model.

    python -m vllm_respsp.draft.evaluate [--head DIR] [--humaneval N] [--out FILE]

Greedy, 256 new tokens, chain of 5 drafts ({"method": "eagle3", "num_speculative_tokens": 5}):
- acceptance length (vLLM's metric: 1 + accepted / drafts) and per-position acceptance rates
  (accepted at position k / drafts) on MT-Bench (80 first turns) and HumanEval (164 by default);
- identity: greedy outputs with the head must equal, token for token, a run without
  speculation on the 80 MT-Bench prompts, both in fp32. The bf16 runs are judged too: there
  rounding differences between 1-token and 6-token target steps can flip near-ties, so each
  divergence is checked against the target's own logits without speculation
  (`testbed.lossless`: "identical", "equal up to N near-ties" or "MISMATCH");
- a cross-check of model.py: the same MT-Bench outputs drafted offline by this package's head.
Each engine runs in its own process (vllm_respsp.testbed.engine_run), so a crashed or leaky
engine cannot affect the next one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_respsp.draft import shipped_head_path
from vllm_respsp.testbed.engines import reference_engine
from vllm_respsp.testbed.lossless import TOP_LOGITS, judge
from vllm_respsp.testbed.model import testbed_model_path

NUM_SPECULATIVE_TOKENS = 5
MAX_NEW_TOKENS = 256


def prompt_token_ids(name: str, model_path: Path, limit: int | None = None) -> list[list[int]]:
    """Token ids exactly as the training data built them: chat template for chat prompts,
    raw text for HumanEval, no extra special tokens."""
    from transformers import AutoTokenizer

    from vllm_respsp.testbed.prompts import load_prompts, render

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    texts = render(load_prompts(name, limit=limit), tokenizer)
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def run_engine_job(job: dict) -> dict:
    """One engine in a fresh process; returns engine_run's JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        job = {**job, "output": str(out)}
        subprocess.run([sys.executable, "-m", "vllm_respsp.testbed.engine_run", json.dumps(job)],
                       check=True, env={**os.environ})
        return json.loads(out.read_text())


def spec_summary(result: dict) -> dict:
    spec = result["spec"]
    drafts = spec["drafts"]
    return {
        "acceptance_length": spec["acceptance_length"],
        "per_position_rate": [a / drafts if drafts else 0.0 for a in spec["accepted_per_pos"]],
        "drafts": drafts,
        "accepted_tokens": spec["accepted_tokens"],
        "output_tokens": result["output_tokens"],
        "seconds": result["seconds"],
        "tokens_per_s": result["tokens_per_s"],
    }


def offline_check(head: Path, model_path: Path, prompts: list[list[int]], outputs: list[list[int]]) -> dict:
    """This package's own simulation of greedy chain drafting (train.offline_acceptance, the
    head run by model.Eagle3Head in fp32, aux states from an HF forward) on the same prompts
    and vLLM outputs: if model.py computes what vLLM's Eagle3 llama computes, the two
    acceptance figures agree up to bf16 rounding."""
    import torch

    from vllm_respsp.draft.data import AuxRecorder, FeatureSequence, load_truncated_target
    from vllm_respsp.draft.model import load_head
    from vllm_respsp.draft.train import offline_acceptance

    draft = load_head(head, model_path).eval()
    target = load_truncated_target(model_path, max(draft.cfg.aux_layers))
    recorder = AuxRecorder(target, draft.cfg.aux_layers)
    sequences = []
    for prompt, output in zip(prompts, outputs):
        ids = torch.tensor(prompt + output)
        with torch.inference_mode():
            target.model(input_ids=ids[None])
        aux = torch.cat([recorder.states[k][0] for k in draft.cfg.aux_layers], dim=-1).float()
        sequences.append(FeatureSequence(ids, aux, len(prompt)))
    return {"prompts": len(prompts), **offline_acceptance(draft, sequences, NUM_SPECULATIVE_TOKENS)}


def identity_check(head: Path, model_path: Path, prompts: list[list[int]], dtype: str) -> dict:
    """Greedy outputs with and without the head, both engines in `dtype`."""
    sampling = {"temperature": 0.0, "max_tokens": MAX_NEW_TOKENS}
    engine = {"max_model_len": 2048, "dtype": dtype}
    spec_config = {"method": "eagle3", "model": str(head), "num_speculative_tokens": NUM_SPECULATIVE_TOKENS}
    plain = run_engine_job({"model": str(model_path), "prompts": prompts, "samplings": [sampling],
                            "engine": engine})["results"][0]
    spec = run_engine_job({"model": str(model_path), "prompts": prompts, "samplings": [sampling],
                           "engine": engine, "speculative_config": spec_config})["results"][0]
    return compare_outputs(plain["token_ids"], spec["token_ids"], dtype)


def compare_outputs(plain: list[list[int]], spec: list[list[int]], dtype: str) -> dict:
    mismatches = [i for i, (a, b) in enumerate(zip(plain, spec)) if a != b]
    return {"prompts": len(plain), "dtype": dtype, "identical": not mismatches, "mismatched_prompts": mismatches}


def bf16_verdict(model_path: Path, plain: list[list[int]], spec: list[list[int]],
                 prompts: list[list[int]]) -> dict:
    """The bf16 outputs with the head against those without, each divergence judged a near-tie
    or a mismatch on the target's raw logits without speculation (one more engine, only if any)."""
    def target_top_logits(contexts: list[list[int]]) -> list[dict[int, float]]:
        job = {"model": str(model_path), "prompts": [], "samplings": [],
               "engine": reference_engine({"max_model_len": 2048}),
               "top_logits": {"contexts": contexts, "k": TOP_LOGITS}}
        return [{int(t): v for t, v in top} for top in run_engine_job(job)["top_logits"]]

    return judge(plain, spec, prompts, "bfloat16", target_top_logits).to_dict()


def evaluate(head: Path, humaneval_limit: int | None = None, mtbench_limit: int | None = None) -> dict:
    model_path = testbed_model_path()
    mtbench = prompt_token_ids("mt-bench", model_path, mtbench_limit)
    humaneval = prompt_token_ids("humaneval", model_path, humaneval_limit)
    sampling = {"temperature": 0.0, "max_tokens": MAX_NEW_TOKENS}
    spec_config = {"method": "eagle3", "model": str(head), "num_speculative_tokens": NUM_SPECULATIVE_TOKENS}
    engine = {"max_model_len": 2048}

    start = time.perf_counter()
    baseline = run_engine_job({"model": str(model_path), "prompts": mtbench, "samplings": [sampling],
                               "engine": engine})["results"][0]
    spec_mt = run_engine_job({"model": str(model_path), "prompts": mtbench, "samplings": [sampling],
                              "speculative_config": spec_config, "engine": engine})["results"][0]
    spec_he = run_engine_job({"model": str(model_path), "prompts": humaneval, "samplings": [sampling],
                              "speculative_config": spec_config, "engine": engine})["results"][0]
    offline = offline_check(head, model_path, mtbench, spec_mt["token_ids"])
    # The bf16 runs above differ on a few prompts: verifying 6 tokens at once changes the bf16
    # rounding of the target's logits, and near-ties flip. In fp32 they must be identical
    # (a real verification bug would show there too), so identity is judged in fp32.
    identity = identity_check(head, model_path, mtbench, "float32")
    return {
        "head": str(head),
        "num_speculative_tokens": NUM_SPECULATIVE_TOKENS,
        "max_new_tokens": MAX_NEW_TOKENS,
        "mt_bench": {"prompts": len(mtbench), **spec_summary(spec_mt)},
        "humaneval": {"prompts": len(humaneval), **spec_summary(spec_he)},
        "mt_bench_no_spec": {"output_tokens": baseline["output_tokens"], "seconds": baseline["seconds"],
                             "tokens_per_s": baseline["tokens_per_s"]},
        "mt_bench_offline_estimate": offline,  # compare with "mt_bench" (same prompts and outputs)
        "identity": identity,
        "identity_bf16": compare_outputs(baseline["token_ids"], spec_mt["token_ids"], "bfloat16"),
        "bf16_verdict": bf16_verdict(model_path, baseline["token_ids"], spec_mt["token_ids"], mtbench),
        "wall_seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", type=Path, default=shipped_head_path())
    parser.add_argument("--humaneval", type=int, default=None, help="first N HumanEval prompts (default all 164)")
    parser.add_argument("--mtbench", type=int, default=None, help="first N MT-Bench prompts (default all 80)")
    parser.add_argument("--out", type=Path, default=None, help="write the results JSON here too")
    args = parser.parse_args()
    results = evaluate(args.head, args.humaneval, args.mtbench)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
