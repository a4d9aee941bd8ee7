#!/usr/bin/env bash
# One-shot GPU check of vllm_respsp_triton: every kernel against its PyTorch
# reference on the GPU, then timings (tree attention grid at the Llama-8B
# shape, per-step metadata + acceptance + compaction overhead), then the
# Triton tree backend's per-step work against causal SDPA (gpu_backend_step.py).
#
# Needs only python3 with torch and triton on a CUDA machine (no vLLM, no
# installs).  Run from anywhere; typically a few minutes, capped at 7.
#   bash benchmarks/gpu_check.sh            # full
#   bash benchmarks/gpu_check.sh --quick    # shorter timing
# Result: Markdown on stdout; JSON in $OUT/gpu_kernels.json when $OUT is set,
# else benchmarks/results/gpu_kernels.json.  Non-zero exit on any failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
unset TRITON_INTERPRET  # compiled kernels, not the interpreter

"$PYTHON" - <<'PY'
import torch, triton
print(f"torch {torch.__version__} | triton {triton.__version__} | CUDA {torch.version.cuda}")
assert torch.cuda.is_available(), "no CUDA device visible"
print(f"device: {torch.cuda.get_device_name()}")
PY

timeout 420 "$PYTHON" benchmarks/gpu_kernels.py "$@"
# The Triton tree backend's whole per-step work on vLLM's TRITON_ATTN layout at Llama-3.1-8B and
# 70B shapes, beside causal SDPA over the same query tokens.
timeout 300 "$PYTHON" benchmarks/gpu_backend_step.py "$@"
