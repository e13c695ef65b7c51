# device call 1 of the seventh pass, from the repository root, with the previous head's package
# unpacked in _ab_head/ (git archive ac3dd9a muonbp_jax). Tall matrices iterated as they are
# (Xᵀ·X from the kernel's column panels, X·Q) against the previous head (transposed copies):
# the kernel against float64, Xᵀ·X timed three ways, interleaved A/B of the updates in separate
# processes (head, new, head, new), quality.
set -x
export PYTHONPATH=.
python -c "import jax, optax, flax, sys; print(sys.version, jax.__version__, optax.__version__, flax.__version__); print(jax.devices())" > $OUT/versions.txt 2>&1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >> $OUT/versions.txt
date -u >> $OUT/versions.txt
timeout 120 python benchmarks/bench_symmetric.py --impls wgmma --skip-products --skip-ns --skip-polynomial --iters 10 --out $OUT/sym.json > $OUT/sym.log 2>&1
R="muonbp P=1 defaults;muonbp block (1,8) defaults"
for i in 1 2; do
  PYTHONPATH=_ab_head:. timeout 100 python benchmarks/ab_update.py --label head$i --runs "$R" --iters 20 > $OUT/ab_head$i.txt 2>&1
  timeout 100 python benchmarks/ab_update.py --label new$i --runs "$R" --iters 20 > $OUT/ab_new$i.txt 2>&1
done
timeout 100 python benchmarks/bench_step.py --skip engines,block_engines,wide,updates,strategies,diagnostics,period --out $OUT/quality.json > $OUT/quality.log 2>&1
grep -v "^$" $OUT/sym.log | grep -v "^{" | tail -40; for f in $OUT/ab_*.txt; do grep -v "^$" $f | tail -4; done; grep -v "^$" $OUT/quality.log | tail -30
