#!/usr/bin/env bash
# The accelerator benchmarks of BENCHMARKS.md in one call, from the repository root, on a GPU or
# TPU host where dlm imports (e.g. PYTHONPATH=.pysite:. with the host's own jax/flax).
# Each command prints a table and, last, one JSON line; everything also goes to $OUT (default .)
#   radd_small bf16 train step at 32 and 64 x 1024 (MFU against the vendor peak; issue 9 goal:
#   >= 45 % at 32, 64 runs), under the preset's remat ('dots') and with none; sampler throughput;
#   BGPO vs VRPO-OL memory over n_t on a 0.94B model.
set -uo pipefail
OUT=${OUT:-.}
run() { echo "== $*"; timeout 900 "$@" 2>&1 | grep -v '^[IW][0-9]' | tail -25 | tee -a "$OUT/bench.log"; }
for batch in 32 64; do
  for remat in dots none; do
    run python -m dlm.bench.train_step --preset=radd_small --dtype=bfloat16 --batch=$batch \
        --seq_len=1024 --config.model.remat=$remat
  done
done
run python -m dlm.bench.sampling --train_steps=1000
run python -m dlm.bench.rl_memory --d_model=2048 --n_layers=16 --vocab=32000 --responses=8 \
    --prompt_len=128 --response_len=256 --dtype=bfloat16
