"""The trace simulator against the engine: vLLM's acceptance length vs the simulated one.

    python -m vllm_respsp.engine_tools.check --traces TR/mt-bench [--shapes chain3 T4/D2/K2 T8/D3/K4]
        [--policy vllm_respsp/assets/policy/smollm2-135m-cpu/bandit.json]

The recording's prompts run through the respsp engine once per static shape and once per policy
file (greedy, the recording's dtype). For each, vLLM's own acceptance length is compared with
the simulator's on the traces, and the outputs with the recording's (<traces>.outputs.json,
written by engine_tools.record): they must be identical.

A policy's choices depend on the batch load it sees, the number of requests in the engine's
batch, which shrinks as a run drains. So policies run one request at a time (max_num_seqs 1)
and are simulated at load 1, where the engine and the simulator see exactly the same states.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_respsp.policy.traces import TraceSet, load_traces
from vllm_respsp.tree.shape import TreeShape


def outputs_path(stem: str | Path) -> Path:
    return Path(f"{str(stem).removesuffix('.json')}.outputs.json")


def simulated_acceptance(traces: TraceSet, policy, hold: int = 1) -> float:
    """vLLM's acceptance length (tokens per verification step) of a fixed action or a policy at load 1.

    Steps that verify no drafts (NO_DRAFTS, or a bounded shape that found no node above its
    bound) are not verification steps in vLLM's counters.
    """
    import numpy as np

    from vllm_respsp.policy.cost import CostModel
    from vllm_respsp.policy.simulator import simulate

    res = simulate(traces, CostModel(("step",), np.ones(1)), policy, batch=1, hold=hold)  # time unused
    free = res.steps - res.drafted_steps  # steps without drafts: one token each, not counted
    return float((res.tokens - free) / res.drafted_steps) if res.drafted_steps else 1.0


def policy_view(traces: TraceSet, policy_file) -> TraceSet:
    """The traces as the policy sees them: its feature blocks, its action order."""
    from vllm_respsp.policy.train import select_features

    traces = select_features(traces, [f.name for f in policy_file.feature_spec])
    return traces.with_actions(policy_file.actions)


def run_checks(stem: str | Path, shapes: list[TreeShape], policies: list[str], model: str, head: str,
               engine: dict, max_num_seqs: int = 16) -> dict:
    from vllm_respsp.policy.policy_file import load_policy
    from vllm_respsp.testbed.engine_run import generate, make_llm

    traces = load_traces(stem)
    recorded = json.loads(outputs_path(stem).read_text())
    texts = [p["text"] for p in recorded["prompts"]]
    reference = [p["output"] for p in recorded["prompts"]]
    greedy = {"temperature": 0.0, "max_tokens": recorded["max_tokens"]}
    runs = [(str(s), {"method": "respsp", "model": head, "shape": s.to_dict()}, max_num_seqs) for s in shapes]
    runs += [(p, {"method": "respsp", "model": head, "policy": p}, 1) for p in policies]
    report = {}
    for name, spec, seqs in runs:
        if "policy" in spec:
            pf = load_policy(name)
            sim = simulated_acceptance(policy_view(traces, pf), pf.net.act, pf.hold)
        else:
            shape = TreeShape.parse(name)
            sim = simulated_acceptance(traces.with_actions([shape]), 0)
        llm = make_llm(model, spec, **{**engine, "max_num_seqs": seqs})
        result = generate(llm, texts, greedy)
        del llm
        identical = sum(a == b for a, b in zip(result.token_ids, reference))
        real = result.spec.acceptance_length
        report[name] = {"engine_acceptance_length": real, "simulated": sim, "max_num_seqs": seqs,
                        "relative_error": abs(sim - real) / real,
                        "identical_outputs": f"{identical}/{len(texts)}"}
        print(f"check {name}: engine {real:.3f}, simulated {sim:.3f} "
              f"({100 * abs(sim - real) / real:.1f}% apart), identical outputs {identical}/{len(texts)}")
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", required=True, help="trace stem written by engine_tools.record")
    parser.add_argument("--shapes", nargs="*", default=[], metavar="SHAPE")
    parser.add_argument("--policy", nargs="*", default=[], metavar="POLICY_FILE")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="for the static shapes")
    parser.add_argument("--out", default=None, help="JSON report (default: <traces>.check.json)")
    args = parser.parse_args(argv)

    from vllm_respsp.testbed.engine_run import prepare_cpu_env

    prepare_cpu_env()
    recorded = json.loads(outputs_path(args.traces).read_text())
    report = run_checks(args.traces, [TreeShape.parse(s) for s in args.shapes], args.policy,
                        recorded["model"], recorded["head"], recorded["engine"], args.max_num_seqs)
    out = Path(args.out or f"{str(args.traces).removesuffix('.json')}.check.json")
    out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
