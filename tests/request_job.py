"""Run phases of requests, each with its own prompt and sampling parameters (structured outputs
included), through one engine; print the tokens, logprobs or error of each phase as JSON.

    python tests/request_job.py @job.json
    job: {model, speculative_config?, engine?, phases: [[{prompt, sampling}, ...], ...]}

A phase is one `LLM.generate` call; a phase that raises records the error and the engine goes
on with the next one (bad requests must not take the engine down).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def sampling_params(sampling: dict):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    sampling = dict(sampling)
    if "structured_outputs" in sampling:
        sampling["structured_outputs"] = StructuredOutputsParams(**sampling["structured_outputs"])
    return SamplingParams(**sampling)


def run(job: dict) -> dict:
    from vllm_respsp.testbed.engine_run import make_llm, prepare_cpu_env

    prepare_cpu_env()
    llm = make_llm(job["model"], job.get("speculative_config"), **job.get("engine", {}))
    phases = []
    for phase in job["phases"]:
        prompts = [{"prompt_token_ids": r["prompt"]} if isinstance(r["prompt"], list) else r["prompt"]
                   for r in phase]
        try:
            outputs = llm.generate(prompts, [sampling_params(r["sampling"]) for r in phase], use_tqdm=False)
        except Exception as e:  # noqa: BLE001
            phases.append({"error": f"{type(e).__name__}: {e}"})
            continue
        phases.append({
            "token_ids": [[list(c.token_ids) for c in o.outputs] for o in outputs],
            "texts": [[c.text for c in o.outputs] for o in outputs],
            "logprobs": [[[sorted((t, round(lp.logprob, 4)) for t, lp in step.items())
                           for step in (c.logprobs or [])] for c in o.outputs] for o in outputs],
        })
    counters = {f"{m.name}{json.dumps(m.labels, sort_keys=True)}": m.value for m in llm.get_metrics()
                if m.name.startswith("vllm:respsp_") or m.name in ("vllm:spec_decode_num_drafts",
                                                                  "vllm:spec_decode_num_accepted_tokens")}
    return {"phases": phases, "metrics": counters}


if __name__ == "__main__":
    arg = sys.argv[1]
    print("RESULT " + json.dumps(run(json.loads(Path(arg[1:]).read_text() if arg.startswith("@") else arg))))
