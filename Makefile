# The two commands a newcomer types: `make demo` and `make test`. Both set up .venv first
# (once; tools/setup_env.sh skips the install while the requirement files are unchanged).
VENV ?= .venv
PY := $(VENV)/bin/python
export VLLM_RESPSP_CACHE ?= $(HOME)/.cache/vllm_respsp

.PHONY: venv demo test test-kernels bench bench-quick bench-serve bench-serve-quick draft-head clean-venv

venv:
	@bash tools/setup_env.sh

demo: venv
	$(PY) -m vllm_respsp.demo

# Kernel tests run in their own process: they need TRITON_INTERPRET=1 set before Triton is
# imported, and that setting must not leak into the vLLM engines the other tests start.
test: venv
	TRITON_INTERPRET=1 $(PY) -m pytest tests/kernels -q
	$(PY) -m pytest tests -q --ignore=tests/kernels

test-kernels: venv
	TRITON_INTERPRET=1 $(PY) -m pytest tests/kernels -q

# Side-by-side offline throughput; pass options with BENCH_ARGS="--batch-sizes 1 4 16 ...".
bench: venv
	$(PY) -m benchmarks.throughput $(BENCH_ARGS)

bench-quick: venv
	$(PY) -m benchmarks.throughput --quick

# The OpenAI server per configuration, driven at several loads (TTFT, TPOT, ITL, throughput).
bench-serve: venv
	$(PY) -m benchmarks.serving $(BENCH_ARGS)

bench-serve-quick: venv
	$(PY) -m benchmarks.serving --quick

draft-head: venv
	$(PY) -m vllm_respsp.draft

clean-venv:
	rm -rf $(VENV)
