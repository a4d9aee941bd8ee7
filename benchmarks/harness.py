"""What every benchmark run shares: its target and head, its results folder, the machine it
ran on, and signals that unwind it (so the engines and servers it started are closed)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import signal
from pathlib import Path


def model_and_head(args) -> tuple[str, str | None]:
    """The target (`--model`, else the testbed model) and the EAGLE-3 head (`--head`, else the
    shipped one if it is there)."""
    from vllm_respsp.draft import shipped_head_if_present
    from vllm_respsp.testbed.model import testbed_model_path

    return args.model or str(testbed_model_path()), args.head or shipped_head_if_present()


def results_folder(kind: str, out: Path | None) -> tuple[str, Path]:
    """The run's UTC stamp and its folder (`out`, or benchmarks/results/<kind>-<stamp>), created."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    out = out or Path("benchmarks/results") / f"{kind}-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    return stamp, out


@contextlib.contextmanager
def unwinding_on_signals():
    """Inside the block SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does: the
    `finally` clauses that close engine processes and servers run on a `kill` too."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def machine_info() -> dict:
    import torch
    import vllm

    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "vllm": vllm.__version__,
            "device": "cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
