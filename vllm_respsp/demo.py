"""`make demo`: the testbed model (SmolLM2-135M-Instruct) answering MT-Bench prompts in vLLM,
and a short side-by-side of no speculation, vLLM's EAGLE-3 chain and respsp's EAGLE-3 tree,
all with the shipped draft head.

Each issue that lands upgrades this to the newest capability. Today: a static respsp tree and,
when the repo ships one, respsp with the learned shape policy (per request, per step).
"""

from __future__ import annotations

import argparse
import textwrap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", default="mt-bench", help="prompt set name or .jsonl path")
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--chain", type=int, default=3, help="EAGLE-3 draft tokens per step")
    parser.add_argument("--tree", default="T4/D2/K2", help="respsp static shape T<total>/D<depth>/K<top_k>")
    parser.add_argument("--policy", default="shipped",
                        help="respsp shape policy file; 'shipped' (default) = the one shipped for this kind "
                             "of CPU, 'none' = skip")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 (fast) or float32 (token-exact comparison)")
    args = parser.parse_args()

    from vllm_respsp.draft import shipped_head_if_present
    from vllm_respsp.testbed.prompts import load_prompts

    head = shipped_head_if_present()
    configs = demo_configs(args, head)
    prompts = load_prompts(args.prompts, limit=args.num_prompts)
    results, verdicts = run_side_by_side(configs, prompts, args)
    print_results(prompts, configs, results, verdicts, args, head)
    failed = [name for name, v in verdicts.items() if not v.ok]
    if failed:
        raise SystemExit(f"MISMATCH: {failed} produced outputs that are not the target's own (not near-ties)")


def demo_configs(args, head: str | None) -> list:
    """No speculation; with a head, vLLM's EAGLE-3 chain, respsp's static tree and its policy."""
    from vllm_respsp.policy.shipped import shipped_policy_if_present
    from vllm_respsp.testbed.engines import EngineConfig, reference_engine
    from vllm_respsp.tree.shape import TreeShape

    engine = {"dtype": args.dtype}
    configs = [EngineConfig("none", None, reference_engine(engine))]
    if head:
        configs.append(EngineConfig("eagle3", {"method": "eagle3", "model": head,
                                               "num_speculative_tokens": args.chain}, engine))
        configs.append(EngineConfig("respsp", {"method": "respsp", "model": head,
                                               "shape": TreeShape.parse(args.tree).to_dict()}, engine))
        policy = shipped_policy_if_present() if args.policy == "shipped" else \
            (None if args.policy == "none" else args.policy)
        if policy:
            configs.append(EngineConfig("respsp-policy", {"method": "respsp", "model": head, "policy": policy,
                                                          "shape": TreeShape.parse(args.tree).to_dict()}, engine))
    return configs


def run_side_by_side(configs: list, prompts: list, args) -> tuple[dict, dict]:
    """Each configuration's outputs on the prompts (one warm-up first, untimed) and, for the
    speculative ones, the lossless verdict against no speculation."""
    from tqdm import tqdm

    from vllm_respsp.testbed.engines import EngineWorker
    from vllm_respsp.testbed.lossless import TOP_LOGITS, judge
    from vllm_respsp.testbed.model import testbed_model_path

    workers = [EngineWorker(str(testbed_model_path()), c) for c in configs]
    try:
        for w in tqdm(workers, desc="starting engines"):
            w.wait_ready()
        texts = workers[0].render(prompts)
        sampling = {"temperature": 0.0, "max_tokens": args.max_tokens}
        for w in workers:
            w.generate(texts[:1], {**sampling, "max_tokens": 8})  # warm-up, not timed
        results = {w.config.name: w.generate(texts, sampling) for w in workers}
        plain = results["none"]
        verdicts = {c.name: judge(plain["token_ids"], results[c.name]["token_ids"], plain["prompt_token_ids"],
                                  args.dtype, lambda contexts: workers[0].top_logits(contexts, TOP_LOGITS))
                    for c in configs if c.speculative_config}
    finally:
        for w in workers:
            w.close()
    return results, verdicts


def print_results(prompts: list, configs: list, results: dict, verdicts: dict, args, head: str | None) -> None:
    plain = results["none"]
    for prompt, answer in zip(prompts, plain["texts"]):
        print("=" * 100)
        print(f"[{prompt.id}] {textwrap.shorten(prompt.text, 300)}")
        print("-" * 100)
        print(answer.strip())
    print("=" * 100)
    print(f"{len(prompts)} prompts at once (batch {len(prompts)}), greedy, {args.max_tokens} new tokens, {args.dtype}, "
          f"vLLM {__import__('vllm').__version__} on CPU:")
    for config in configs:
        r = results[config.name]
        extra = ""
        if config.speculative_config:
            extra = (f", acceptance length {r['spec']['acceptance_length']:.2f}, "
                     f"speedup {r['tokens_per_s'] / plain['tokens_per_s']:.2f}x, output vs no speculation: "
                     f"{verdicts[config.name].label()}")
        print(f"  {config.describe():<24} {r['tokens_per_s']:6.1f} output tokens/s{extra}")
    if not head:
        print("  (no shipped EAGLE-3 head found: run `make draft-head` to train one)")
    elif any(v.divergences and v.ok for v in verdicts.values()):
        print("  near-tie: in bf16 verifying several tokens per step changes the rounding of the target's\n"
              "  logits; where the two best tokens are within a few bf16 steps the argmax can flip (checked\n"
              "  against the target's own logits without speculation); `--dtype float32` compares token-exactly.")


if __name__ == "__main__":
    main()
