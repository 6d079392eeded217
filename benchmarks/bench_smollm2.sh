#!/usr/bin/env bash
# The reported CPU benchmark: SmolLM2-135M-Instruct, Spec-Bench, all four methods, bf16 then fp32.
# Usage: bash benchmarks/bench_smollm2.sh [PER_CATEGORY] [THREADS]
# PER_CATEGORY 5 is the full report (~1 h per dtype on a busy 2-core CPU); THREADS=1 keeps torch from
# collapsing when the CPU is shared (2 threads on an oversubscribed 2-core box ran 10x slower).
set -euo pipefail
PER_CATEGORY=${1:-5}
THREADS=${2:-1}
QUESTIONS=${MSN_SPEC_BENCH:-../shared/data/spec_bench/question.jsonl}
for DTYPE in bf16 fp32; do
  msn bench --model smollm2-135m --dtype "$DTYPE" --questions "$QUESTIONS" --per-category "$PER_CATEGORY" \
    --methods ar,pld,jacobi,tr-jacobi --max-new-tokens 128 --threads "$THREADS" --out "runs/bench-$DTYPE"
done
