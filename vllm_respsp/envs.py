"""Every environment variable vllm_respsp reads, in one place (the model: vLLM's `envs.py`).

Each variable is read through a function here, at the time it is needed (not at import), so a
test or a spawned engine process sees what its environment says. Nothing else in the package
reads `os.environ` for a `VLLM_RESPSP_*` name. Fault injection is not here: it belongs to the
tests (tests/engine_hooks).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE = "VLLM_RESPSP_CACHE"
DRAFT_WORK = "VLLM_RESPSP_DRAFT_WORK"
DRAFT_REEXEC = "VLLM_RESPSP_DRAFT_REEXEC"
DISABLE_PATCHES = "VLLM_RESPSP_DISABLE_PATCHES"
STATS_FILE = "VLLM_RESPSP_STATS_FILE"
STEP_TIMES = "VLLM_RESPSP_STEP_TIMES"
RECORD = "VLLM_RESPSP_RECORD"
METRICS_DIR = "VLLM_RESPSP_METRICS_DIR"
ALLOW_ANY_VLLM = "VLLM_RESPSP_ALLOW_ANY_VLLM"

# name -> what it means (the README's table is `markdown_table()` of this, which a test checks,
# as it checks that no other module reads a VLLM_RESPSP_* variable).
VARIABLES: dict[str, str] = {
    "VLLM_RESPSP_CACHE": "folder for the converted testbed model, traces and draft-head work "
                         "(default ~/.cache/vllm_respsp)",
    "VLLM_RESPSP_DRAFT_WORK": "the draft-head pipeline's work folder for features and checkpoints "
                              "(default $VLLM_RESPSP_CACHE/draft-work)",
    "VLLM_RESPSP_DRAFT_REEXEC": "internal: set by `python -m vllm_respsp.draft` once it has re-executed "
                                "itself with Intel OpenMP preloaded",
    "VLLM_RESPSP_DISABLE_PATCHES": "comma-separated patch names not to apply (bisecting; the tests "
                                   "that show what a fix fixes)",
    "VLLM_RESPSP_STATS_FILE": "each engine step rewrites this JSON file with the runtime's "
                              "statistics (shapes, fallbacks, phase seconds, a digest of every decision "
                              "for comparing tensor-parallel ranks); tensor-parallel rank 1 writes "
                              "PATH.rank1, and so on; instrumentation: the write costs ~0.2 ms a step "
                              "on a 2-core CPU",
    "VLLM_RESPSP_STEP_TIMES": "append one line per model step (start time, requests, tokens) to this "
                              "file: the step clock behind engine_tools.profile and the per-phase tables",
    "VLLM_RESPSP_RECORD": "record draft pools for every request into this folder instead of drafting "
                          "(engine_tools.record sets it)",
    "VLLM_RESPSP_METRICS_DIR": "Prometheus multiprocess folder for respsp's counters when vLLM has "
                               "none (PROMETHEUS_MULTIPROC_DIR wins)",
    "VLLM_RESPSP_ALLOW_ANY_VLLM": "1: let respsp start on a vLLM version it was not checked against "
                                  "(at your own risk; the seams it patches may have moved)",
}


def _get(name: str) -> str | None:
    assert name in VARIABLES, f"{name} is not declared in vllm_respsp.envs.VARIABLES"
    value = os.environ.get(name)
    return value or None


def cache_dir() -> Path:
    return Path(_get("VLLM_RESPSP_CACHE") or Path.home() / ".cache" / "vllm_respsp")


def draft_work_dir() -> Path:
    return Path(_get("VLLM_RESPSP_DRAFT_WORK") or cache_dir() / "draft-work")


def disabled_patches() -> set[str]:
    return {n.strip() for n in (_get("VLLM_RESPSP_DISABLE_PATCHES") or "").split(",") if n.strip()}


def stats_file() -> str | None:
    return _get("VLLM_RESPSP_STATS_FILE")


def step_times_file() -> str | None:
    return _get("VLLM_RESPSP_STEP_TIMES")


def record_dir() -> str | None:
    return _get("VLLM_RESPSP_RECORD")


def metrics_dir() -> str | None:
    return _get("VLLM_RESPSP_METRICS_DIR")


def set_metrics_dir(path: str) -> None:
    """The metrics folder chosen for this process, inherited by the processes it starts."""
    os.environ["VLLM_RESPSP_METRICS_DIR"] = path


def draft_reexecuted() -> bool:
    return _get(DRAFT_REEXEC) == "1"


def allow_any_vllm() -> bool:
    return _get("VLLM_RESPSP_ALLOW_ANY_VLLM") == "1"


def markdown_table() -> str:
    """The README's table of variables (`python -m vllm_respsp.envs` prints it)."""
    rows = [f"| `{name}` | {meaning.replace('|', '/')} |" for name, meaning in VARIABLES.items()]
    return "\n".join(["| variable | meaning |", "|---|---|", *rows])


if __name__ == "__main__":
    print(markdown_table())
