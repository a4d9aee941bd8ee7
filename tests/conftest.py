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
# The environment before any test builds a vLLM config in this process: vLLM's CPU platform
# edits os.environ (LD_PRELOAD, thread settings) and engines started later must not inherit it.
BASE_ENV = dict(os.environ)


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


def run_engine(job: dict, env: dict | None = None, timeout: int = 600) -> dict:
    """Run `vllm_respsp.testbed.engine_run` on `job` in a fresh process; return its JSON."""
    full_env = {**BASE_ENV, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_respsp.testbed.engine_run", "@" + _job_file(job)],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"engine run failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULT "):])
