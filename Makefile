# The two commands a newcomer types: `make demo` and `make test`. Both set up .venv first
# (once; tools/setup_env.sh skips the install while the requirement files are unchanged).
VENV ?= .venv
PY := $(VENV)/bin/python
export VLLM_RESPSP_CACHE ?= $(HOME)/.cache/vllm_respsp

.PHONY: venv demo test lint test-kernels bench bench-quick policy bench-serve bench-serve-quick draft-head clean-venv

venv:
	@bash tools/setup_env.sh

demo: venv
	$(PY) -m vllm_respsp.demo

# Kernel tests run in their own process: they need TRITON_INTERPRET=1 set before Triton is
# imported, and that setting must not leak into the vLLM engines the other tests start.
# The slowest tests are listed at the end: CI's time (aim < 30 min) is spent on engine starts.
test: venv
	TRITON_INTERPRET=1 $(PY) -m pytest tests/kernels -q
	$(PY) -m pytest tests -q --ignore=tests/kernels --durations=15

lint: venv
	$(VENV)/bin/ruff check .

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

# The shape policy from scratch (~1.5 h on 2 cores): record trace tables in the engine (one
# draft pool per beam width: ShareGPT train slice; MT-Bench and HumanEval held out), measure
# this CPU's cost profile (alone: other jobs on the cores skew it), train the shipped policy
# (its report.json: simulated tokens/s on the held-out sets), measure its load gate in the engine
# against no speculation (bandit.gate.json), and check its acceptance length in the engine
# against the simulator's. A rerun after an interruption skips the trace sets already
# recorded with the same head, target and arguments (record's --force records again).
TRACES ?= $(VLLM_RESPSP_CACHE)/traces
# One policy and cost profile per kind of CPU (AMX or AVX-512: vllm_respsp/policy/shipped.py);
# this recipe trains the one of the CPU it runs on. Expanded when the recipe runs, after venv.
POLICY_DIR = $(shell $(PY) -m vllm_respsp.policy.shipped policy)
PROFILE = $(shell $(PY) -m vllm_respsp.policy.shipped profile)
# On this CPU trees pay for re-running attention through their masks: the policy picks among
# chains, confidence-bounded chains and NO_DRAFTS.
POLICY_ACTIONS := chain1 chain2 chain3 chain4 chain6 $(foreach p,0.1 0.2 0.3 0.4 0.5 0.6 0.7,T8/D8/K1/p$(p))
policy: venv
	$(PY) -m vllm_respsp.engine_tools.record --prompts sharegpt-train --unseen-by-head --num-prompts 900 --max-prompt-tokens 768 --out $(TRACES)/sharegpt-train
	$(PY) -m vllm_respsp.engine_tools.record --prompts mt-bench --out $(TRACES)/mt-bench --check chain3 T4/D2/K2 T8/D3/K4
	$(PY) -m vllm_respsp.engine_tools.record --prompts humaneval --num-prompts 164 --out $(TRACES)/humaneval
	$(PY) -m vllm_respsp.engine_tools.profile --out vllm_respsp/policy/profiles/$(PROFILE).json \
		--batch-sizes 1 8 32 --reps 3 --max-engines 5
	$(PY) -m vllm_respsp.policy.train --traces $(TRACES)/sharegpt-train.json \
		--eval-traces $(TRACES)/mt-bench.json $(TRACES)/humaneval.json --actions $(POLICY_ACTIONS) \
		--profile $(PROFILE) --algo bandit --features draft_root_probs --bandit-epochs 40 --out $(POLICY_DIR)
	$(PY) -m vllm_respsp.engine_tools.gate --policy $(POLICY_DIR)/bandit.json
	$(PY) -m vllm_respsp.engine_tools.check --traces $(TRACES)/mt-bench --policy $(POLICY_DIR)/bandit.json

clean-venv:
	rm -rf $(VENV)
