# Device call 3 (2026-12-04), from the repository root at the commit after bd6c5ff's library
# code (working tree = the new code, PYTHONPATH=.), with the previous head's package in
# _ab_head/ (git archive 9c6ad06 muonbp_jax) for a third A/B round.
set -x
export PYTHONPATH=.
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv; python -c "import sys, jax, optax, flax; print(sys.version); print(jax.__version__, optax.__version__, flax.__version__)"; date -u; } > $OUT/call3_versions.txt 2>&1
timeout 150 python benchmarks/ab_update.py --label new3 --runs "optax.contrib.muon;optax.adamw;muonbp P=1 defaults;muonbp block (1,8) defaults" --iters 20 > $OUT/call3_ab_new3.txt 2>&1
tail -8 $OUT/call3_ab_new3.txt
timeout 270 python benchmarks/bench_period.py --layers 16 --periods 2 --out $OUT/call3_period16.json > $OUT/call3_period16.log 2>&1
tail -12 $OUT/call3_period16.log
PYTHONPATH=_ab_head:. timeout 90 python benchmarks/ab_update.py --label head3 --runs "muonbp P=1 defaults;muonbp block (1,8) defaults" --iters 20 > $OUT/call3_ab_head3.txt 2>&1
tail -5 $OUT/call3_ab_head3.txt
timeout 60 python benchmarks/bench_step.py --skip engines,block_engines,wide,updates,strategies,diagnostics,period --out $OUT/call3_quality.json > $OUT/call3_quality.log 2>&1
tail -20 $OUT/call3_quality.log
