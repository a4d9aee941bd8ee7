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
