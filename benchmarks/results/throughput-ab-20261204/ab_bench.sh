#!/bin/bash
# old (6b2fa5a, before the backend seam) and new code, alternately: throughput of the respsp columns
# It expects checkouts of the two commits at /tmp/old and /tmp/new and this repo at /work/main.
set -e
OUT=/work/main/benchmarks/results/throughput-ab-20261204
mkdir -p $OUT
ARGS="--prompt-sets mt-bench --batch-sizes 1 4 16 --num-prompts 16 --max-tokens 48 --chains 3 --respsp chain3 T8/D3/K4 --policies vllm_respsp/assets/policy/smollm2-135m-cpu/bandit.json --reps 1"
for i in 1 2; do
  (cd /tmp/old && PYTHONPATH=/tmp/old /work/main/.venv/bin/python -m benchmarks.throughput $ARGS --out $OUT/old_$i) > $OUT/old_$i.log 2>&1
  (cd /tmp/new && PYTHONPATH=/tmp/new /work/main/.venv/bin/python -m benchmarks.throughput $ARGS --k-by-batch none --out $OUT/new_$i) > $OUT/new_$i.log 2>&1
done
echo done
