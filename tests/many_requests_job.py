"""Push many tiny requests through one respsp engine (vLLM's AsyncLLM, the server's engine
client), some aborted right after their first output, while their tree is in flight; report
time, memory and the runtime's live per-request state as JSON.

    python tests/many_requests_job.py @job.json
    job: {model, speculative_config, requests, concurrency, abort_every, stats_file}

Runs on the successor pair: every answer is known (t+1, t+2, ...) and checked.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path


def rss_kib(pid: int, children_only: bool = False) -> int:
    """Resident memory of a process and its descendants (or of its descendants only)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            if not (children_only and p == pid):
                total += int(next(l for l in open(f"/proc/{p}/status") if l.startswith("VmRSS")).split()[1])
            todo += [int(c) for c in open(f"/proc/{p}/task/{p}/children").read().split()]
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            pass
    return total


def probe(worker) -> dict:
    """Runs inside the model-runner worker (vLLM's collective_rpc): Python objects, tensors and
    the size of every container the respsp runtime and its parts hold."""
    import gc
    from collections import Counter

    import torch

    gc.collect()
    objects = gc.get_objects()
    tensors = [o for o in objects if type(o) is torch.Tensor or type(o) is torch.nn.Parameter]
    runner = worker.model_runner
    runtime = getattr(runner, "_respsp_runtime", None)
    held, todo, seen = {}, [("runtime", runtime)], set()
    while todo:  # containers reachable through the runtime's own objects (not vLLM's, not modules)
        name, obj = todo.pop()
        if obj is None or id(obj) in seen or not type(obj).__module__.startswith("vllm_respsp"):
            continue
        seen.add(id(obj))
        fields = obj._asdict() if hasattr(obj, "_asdict") else getattr(obj, "__dict__", {})  # NamedTuples too
        for attr, value in fields.items():
            if isinstance(value, (dict, list, set)):
                held[f"{name}.{attr}"] = len(value)
            elif not isinstance(value, torch.nn.Module):
                todo.append((f"{name}.{attr}", value))
    return {"objects": len(objects), "types": dict(Counter(type(o).__name__ for o in objects)),
            "tensors": len(tensors), "tensor_mib": round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 2),
            "runner_requests": len(runner.requests), "respsp_containers": held}


def request(i: int, abort_every: int) -> tuple[list[int], dict, bool]:
    start = 3 + i % 120
    prompt = [start - j for j in range(1 + i % 3)][::-1]  # 1-3 tokens ending in `start`
    abort = abort_every > 0 and i % abort_every == abort_every - 1
    sampling = {"temperature": [0.0, 0.8][i % 2], "max_tokens": 60 if abort else 2 + i % 3,
                "ignore_eos": True}
    return prompt, sampling, abort


async def run(job: dict) -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from vllm_respsp.testbed.engine_run import prepare_cpu_env

    prepare_cpu_env()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=job["model"], speculative_config=job["speculative_config"], enforce_eager=True,
        dtype="float32", max_model_len=256, seed=0, disable_log_stats=True, **job.get("engine", {})))
    gate = asyncio.Semaphore(job["concurrency"])
    wrong, aborted = [], 0

    async def one(i: int):
        nonlocal aborted
        prompt, sampling, abort = request(i, job["abort_every"])
        async with gate:
            tokens = []
            async for out in engine.generate({"prompt_token_ids": prompt}, SamplingParams(**sampling), f"r{i}"):
                tokens = list(out.outputs[0].token_ids)
                if abort:
                    await engine.abort(f"r{i}")
                    aborted += 1
                    break
        expected = [(prompt[-1] + 1 + j) % 128 for j in range(sampling["max_tokens"])]
        if tokens != expected[:len(tokens)] or (not abort and len(tokens) != len(expected)):
            wrong.append({"i": i, "tokens": tokens, "expected": expected})

    async def batch(lo: int, hi: int):
        await asyncio.gather(*(one(i) for i in range(lo, hi)))

    def live_state() -> dict:
        if not job["speculative_config"] or job["speculative_config"].get("method") != "respsp":
            return {}  # the reference runs: no speculation, vLLM's EAGLE-3
        stats = json.loads(Path(job["stats_file"]).read_text())
        return {k: v for k, v in stats.items() if k.startswith("live_")} | {"fallbacks": stats["fallbacks"]}

    async def memory(look_inside: bool) -> dict:
        me = os.getpid()
        engine_kib = rss_kib(me, children_only=True)  # engine core and its worker
        worker = (await asyncio.wait_for(engine.collective_rpc(probe), 300))[0] if look_inside else None
        return {"engine_kib": engine_kib, "frontend_kib": rss_kib(me) - engine_kib, "worker": worker}

    n, chunks = job["requests"], 10
    edges = [n * k // chunks for k in range(chunks + 1)]
    seconds, tenths = 0.0, []
    try:
        for lo, hi in zip(edges, edges[1:]):  # the first tenth is the warm-up
            start = time.perf_counter()
            await batch(lo, hi)
            seconds += time.perf_counter() - start
            tenths.append({**await memory(lo == 0 or hi == n), "live": live_state()})
        # One more request: the runtime forgets finished requests at its next step.
        await batch(n, n + 1)
        idle = {**await memory(True), "live": live_state()}
    finally:
        engine.shutdown()
    return {"requests": n + 1, "aborted": aborted, "wrong": wrong[:5], "num_wrong": len(wrong),
            "seconds": round(seconds, 1), "tenths": tenths, "idle": idle}

if __name__ == "__main__":
    arg = sys.argv[1]
    job = json.loads(Path(arg[1:]).read_text() if arg.startswith("@") else arg)
    os.environ["VLLM_RESPSP_STATS_FILE"] = job["stats_file"]
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # the probe travels to the worker by cloudpickle
    print("RESULT " + json.dumps(asyncio.run(run(job))))
