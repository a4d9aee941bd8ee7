"""Shared test helpers: fixture models built once per session, and engine runs in subprocesses.

Each vLLM engine runs in a fresh Python process so that the plugin, its patches and the
environment (e.g. VLLM_PLUGINS) are exactly what the test says, and so no engine state leaks
between tests. Engine starts cost ~15-20 s each here: tests share runs through module-scoped
fixtures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
HOOKS = Path(__file__).resolve().parent / "engine_hooks"
# The environment before any test builds a vLLM config in this process: vLLM's CPU platform
# edits os.environ (LD_PRELOAD, thread settings) and engines started later must not inherit it.
# Every process a test starts gets the test-only engine hooks (faults, TRITON_ATTN on CPU; off
# unless the test's environment asks for one: engine_hooks/sitecustomize.py).
BASE_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    p for p in (str(HOOKS), os.environ.get("PYTHONPATH", "")) if p)}
ENGINE_ENV = {**BASE_ENV, "VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.fixture(autouse=True)
def _restore_environment():
    """Tests that build vLLM configs or start engines in-process leave os.environ as found."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def fixture_models(tmp_path_factory) -> dict[str, Path]:
    from vllm_respsp.testbed.fixtures import build_all

    return build_all(tmp_path_factory.mktemp("fixture-models"))


def _job_file(job: dict) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    return f.name


def run_job(command: list[str], job: dict, env: dict | None = None, timeout: int = 600) -> dict:
    """The one engine harness: run `command @job.json` in a fresh process (the engine's own
    environment plus `env`) and return the JSON it prints after "RESULT "."""
    proc = subprocess.run([*command, "@" + _job_file(job)], cwd=REPO, env={**ENGINE_ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"engine run failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run_engine(job: dict, env: dict | None = None, timeout: int = 600) -> dict:
    """`vllm_respsp.testbed.engine_run` on `job` (model, prompts, samplings, ...)."""
    return run_job([sys.executable, "-m", "vllm_respsp.testbed.engine_run"], job, env, timeout)


def run_requests(job: dict, env: dict | None = None, timeout: int = 600) -> dict:
    """tests/request_job.py on `job` (phases of requests, each with its own sampling)."""
    return run_job([sys.executable, "tests/request_job.py"], job, env, timeout)


def requests_with_and_without(job: dict, speculative_config: dict, stats: Path) -> tuple[dict, dict, dict]:
    """`job`'s phases without speculation and with `speculative_config`: (plain, speculative,
    the speculative runtime's stats file)."""
    plain = run_requests(job)
    spec = run_requests({**job, "speculative_config": speculative_config},
                        env={"VLLM_RESPSP_STATS_FILE": str(stats)})
    return plain, spec, json.loads(stats.read_text())


# The output distribution at temperature 0.8 (test_respsp_trees on the CPU backend,
# test_triton_backend on the Triton one): both compare against one set of samples without
# speculation, drawn once per session.
TINY_TREE = {"total_tokens": 6, "depth": 3, "top_k": 3}


@pytest.fixture(scope="session")
def soft_pair(tmp_path_factory):
    """A successor target whose next token is the successor only ~half the time at T=0.8, and
    its successor head: drafts are accepted often enough and rejected often enough."""
    from vllm_respsp.testbed.fixtures import successor_eagle3_head, successor_llama

    root = tmp_path_factory.mktemp("soft-successor")
    target = successor_llama(root / "target", margin=4.0)
    return target, successor_eagle3_head(root / "head", target)


# 8,000 samples a run: subsampling 20,000-sample runs (2026-12-06), the biased sampler of
# test_respsp_trees still scores p <= 1e-89 at 8,000 (1e-35 at 4,000) and the correct one spread
# as a p-value should; a run of 20,000 cost ~80 s of CI here.
def sample_first_tokens(target, spec, n=8_000, env=None, timeout=1200):
    """The first 3 tokens of `n` requests for one prompt at temperature 0.8 (token ids [n, 3]),
    and the engine's speculation counters."""
    job = {"model": str(target), "prompts": [[5, 9, 30]] * n,
           "samplings": [{"temperature": 0.8, "max_tokens": 3, "ignore_eos": True}],
           "engine": {"dtype": "float32", "max_model_len": 64, "max_num_seqs": 512},
           "speculative_config": spec}
    result = run_engine(job, env=env, timeout=timeout)["results"][0]
    return torch.tensor(result["token_ids"]), result["spec"]


@pytest.fixture(scope="session")
def no_spec_samples(soft_pair):
    return sample_first_tokens(soft_pair[0], None)[0]


def marginals_p_value(a, b, vocab: int) -> float:
    """Two-sample chi-square over the token marginals at each position (bins with few
    samples merged), combined: the smallest p-value times the number of positions."""
    p_values = []
    for pos in range(a.shape[1]):
        ca = torch.bincount(a[:, pos], minlength=vocab).double()
        cb = torch.bincount(b[:, pos], minlength=vocab).double()
        small = (ca + cb) < 10
        ca = torch.cat([ca[~small], ca[small].sum().view(1)])
        cb = torch.cat([cb[~small], cb[small].sum().view(1)])
        keep = (ca + cb) > 0
        ca, cb = ca[keep], cb[keep]
        ka, kb = (cb.sum() / ca.sum()).sqrt(), (ca.sum() / cb.sum()).sqrt()
        stat = ((ka * ca - kb * cb) ** 2 / (ca + cb)).sum()
        dof = torch.tensor((keep.sum().item() - 1) / 2, dtype=torch.float64)
        p_values.append(float(torch.special.gammaincc(dof, stat / 2)))
    return min(1.0, min(p_values) * len(p_values))
