"""Prometheus counters of the respsp runtime, visible on the OpenAI server's /metrics.

The runtime lives in vLLM's engine-core process; /metrics is served by the API server process,
whose registry only sees that process's own metrics (vLLM ships engine-core statistics to the
front end inside its step outputs, a channel a plugin cannot extend). So the counters cross the
process boundary the way prometheus_client's multiprocess mode does: the engine core writes
them into a memory-mapped `counter_*.db` file (prometheus_client's own format), and the front
end reads every such file of the directory at scrape time with `MultiProcessCollector`.

- `setup_frontend()` runs where the respsp speculative config is created (the API server, or the
  `LLM` process): it picks the directory and registers the collector. With vLLM's own
  multiprocess mode on (`PROMETHEUS_MULTIPROC_DIR` set by the user or by `--api-server-count`
  > 1) the files go into that directory, which vLLM's registry already collects. Otherwise a
  private temporary directory, named in `VLLM_RESPSP_METRICS_DIR` so that the engine core (a
  child process) inherits it, is collected into prometheus_client's default registry, the one
  a single API server exposes and `LLM.get_metrics()` reads.
- `record_fallback(kind)` runs in the engine core, once per fallback: one mmap write.

Exposed: `vllm:respsp_fallbacks_total{kind="drafter_error"|"chain_for_logprobs"|...}`,
`vllm:respsp_tree_shapes_total{shape="T8/D4/K2"}` (trees drafted per shape) and
`vllm:respsp_schedule_steps_total{mode="policy"|"chain1"|...|"no_drafts"}` (steps the measured
schedule ran in each mode, policy/schedule.py).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading

from vllm_respsp import envs

logger = logging.getLogger("vllm_respsp")

FALLBACKS = ("vllm:respsp_fallbacks", "kind",
             "Times a respsp safety net fired (drafting failed, chains for vLLM's sampler, ...)")
SHAPES = ("vllm:respsp_tree_shapes", "shape", "Draft trees proposed by respsp, per tree shape")
MODES = ("vllm:respsp_schedule_steps", "mode", "Engine steps respsp's measured schedule ran in each mode")

_lock = threading.Lock()
_private_dir: tempfile.TemporaryDirectory | None = None
_collector = None
_file = None  # (pid, directory, MmapedDict) of this process
# (metric, label) -> [its key in the mmap file, its value]; values are of the open file only
_counters: dict[tuple[str, str], list] = {}


def metrics_dir() -> str | None:
    """Where this process's counters go: vLLM's multiprocess directory if set, else ours."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or envs.metrics_dir()


def setup_frontend() -> str:
    """Make respsp's counters part of this process's /metrics (idempotent); returns the directory.

    Must run before the engine core starts, so that it inherits the directory."""
    global _private_dir, _collector
    with _lock:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return os.environ["PROMETHEUS_MULTIPROC_DIR"]  # vLLM's registry collects the directory
        path = envs.metrics_dir()
        if not path or not os.path.isdir(path):
            _private_dir = tempfile.TemporaryDirectory(prefix="respsp-metrics-")
            path = _private_dir.name
            envs.set_metrics_dir(path)
        if _collector is None or _collector._path != path:
            from prometheus_client import REGISTRY
            from prometheus_client.multiprocess import MultiProcessCollector

            if _collector is not None:
                REGISTRY.unregister(_collector)
            _collector = MultiProcessCollector(REGISTRY, path=path)
        return path


def _increment(metric: tuple[str, str, str], label: str, count: float) -> None:
    """Runs every engine step (shapes): the file is opened and the key built once, not per call."""
    global _file
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    name, label_name, help_text = metric
    with _lock:
        path, pid = metrics_dir(), os.getpid()
        if _file is None or _file[:2] != (pid, path):
            if not path or not os.path.isdir(path):
                return  # no front end collects them (e.g. an engine started without setup_frontend)
            # Not `counter_<pid>.db`: prometheus_client's own counters of this process may own that.
            _file = (pid, path, MmapedDict(os.path.join(path, f"counter_respsp-{pid}.db")))
            _counters.clear()
        counter = _counters.get((name, label))
        if counter is None:
            key = mmap_key(name, name + "_total", [label_name], [label], help_text)
            counter = _counters[name, label] = [key, _file[2].read_value(key)[0]]
        counter[1] += count
        _file[2].write_value(counter[0], counter[1], 0.0)


def _record(metric: tuple[str, str, str], label: str, count: float) -> None:
    """Never raises: a metric must not cost a step."""
    try:
        _increment(metric, label, count)
    except Exception:  # noqa: BLE001
        logger.exception("respsp: could not record %s", metric[0])


def record_fallback(kind: str, count: int = 1) -> None:
    """Count `count` fallbacks of this kind."""
    _record(FALLBACKS, kind, count)


def record_shape(shape: str, count: int = 1) -> None:
    """Count `count` draft trees of this shape (e.g. "T8/D4/K2")."""
    _record(SHAPES, shape, count)


def record_mode(mode: str) -> None:
    """Count one engine step the measured schedule ran in this mode."""
    _record(MODES, mode, 1)
