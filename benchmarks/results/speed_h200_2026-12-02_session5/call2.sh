# device call 2 of the fifth pass, from the repository root: the wgmma kernel checked against
# float64 and timed (float16 operands now), then bench_step with ns_product="auto" (the new
# default: the kernel on Hopper) and "dense" side by side, then an interleaved A/B.
set -x
export PYTHONPATH=.
python -c "import jax, optax, flax, sys; print(sys.version, jax.__version__, optax.__version__, flax.__version__); print(jax.devices())" > $OUT/versions.txt 2>&1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >> $OUT/versions.txt
timeout 150 python benchmarks/bench_symmetric.py --impls triangular,wgmma --ns-products dense,wgmma --iters 10 --out $OUT/sym.json > $OUT/sym.log 2>&1
timeout 280 python benchmarks/bench_step.py --out $OUT/bench_step.json > $OUT/bench_step.log 2>&1
R="muonbp P=1 defaults;muonbp P=1 ns_product=dense (XLA matmuls only);muonbp block (1,8) defaults;muonbp block (1,8) ns_product=dense"
timeout 100 python benchmarks/ab_update.py --label call2 --runs "$R" --iters 20 > $OUT/ab.txt 2>&1
grep -v "^$" $OUT/sym.log | tail -62; tail -150 $OUT/bench_step.log; grep -v "^$" $OUT/ab.txt | tail -12
