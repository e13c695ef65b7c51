#!/usr/bin/env bash
# The block step-size study of benchmarks/RESULTS.md on one machine with one GPU and 16 cores:
# the GPU preset in 4 processes sharing the GPU (one core each), the CPU preset (8 fake devices)
# in 4 processes of 3 cores. Every process resumes from what is already in DIR.
# Usage: bash benchmarks/run_block_lr_study.sh [DIR] [SECONDS] [GPU study options...]
set -u
dir="${1:-runs}"; limit="${2:-540}"; shift 2 || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$dir/block_lr_gpu" "$dir/block_lr_cpu"
for i in 0 1 2 3; do
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 taskset -c "$i" timeout "$limit" \
    python3 benchmarks/block_lr_study.py --preset gpu --shard "$i/4" --resume "$@" \
    --out "$dir/block_lr_gpu" > "$dir/block_lr_gpu/log-$i.txt" 2>&1 &
done
for i in 0 1 2 3; do
  lo=$((4 + 3 * i)); hi=$((lo + 2))
  JAX_PLATFORMS=cpu taskset -c "$lo-$hi" timeout "$limit" \
    python3 benchmarks/block_lr_study.py --preset cpu --shard "$i/4" --resume \
    --out "$dir/block_lr_cpu" > "$dir/block_lr_cpu/log-$i.txt" 2>&1 &
done
wait
for d in block_lr_gpu block_lr_cpu; do
  python3 benchmarks/block_lr_study.py --report-only --out "$dir/$d" > /dev/null 2>&1
  tail -n 2 "$dir/$d"/log-*.txt
done
