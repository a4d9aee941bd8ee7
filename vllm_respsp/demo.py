"""`make demo`: the testbed model (SmolLM2-135M-Instruct) answering MT-Bench prompts in vLLM.

Each issue that lands upgrades this to the newest capability; today it is plain vLLM offline
generation on this machine, with the answers and the measured speed.
"""

from __future__ import annotations

import argparse
import textwrap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", default="mt-bench", help="prompt set name or .jsonl path")
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    from vllm_respsp.testbed.engine_run import generate, make_llm, prepare_cpu_env
    from vllm_respsp.testbed.model import testbed_model_path
    from vllm_respsp.testbed.prompts import load_prompts, render

    prepare_cpu_env()
    model = testbed_model_path()
    prompts = load_prompts(args.prompts, limit=args.num_prompts)
    llm = make_llm(str(model), max_model_len=2048)
    texts = render(prompts, llm.get_tokenizer())
    sampling = {"temperature": 0.0, "max_tokens": args.max_tokens}
    generate(llm, texts[:1], {**sampling, "max_tokens": 8})  # warm-up, not timed
    result = generate(llm, texts, sampling)

    for prompt, answer in zip(prompts, result.texts):
        print("=" * 100)
        print(f"[{prompt.id}] {textwrap.shorten(prompt.text, 300)}")
        print("-" * 100)
        print(answer.strip())
    print("=" * 100)
    print(f"{len(prompts)} prompts, {result.output_tokens} tokens in {result.seconds:.1f} s: "
          f"{result.tokens_per_s:.1f} output tokens/s (batch {len(prompts)}, no speculation, "
          f"vLLM {__import__('vllm').__version__} on CPU)")


if __name__ == "__main__":
    main()
