# Device call 1 (2026-12-04): where the block step's and P=1's non-matmul time goes, with HLO.
set -x
D=benchmarks/results/speed_h200_2026-12-04_session8
export PYTHONPATH=.
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv; python -c "import sys, jax, optax, flax; print(sys.version); print(jax.__version__, optax.__version__, flax.__version__)"; date -u; } > $OUT/call1_versions.txt 2>&1
timeout 300 python benchmarks/update_profile.py --top 80 --hlo $OUT/hlo --out $OUT/call1_profile.json > $OUT/call1_profile.log 2>&1
tail -5 $OUT/call1_profile.log
