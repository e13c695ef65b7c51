# device call 1 of the sixth pass, from the repository root. The Mosaic kernel (now with its own
# vmap and derivative rules, and square_polynomial: α·I + β·R + γ·R² formed in its epilogue)
# against float64; the polynomial timed four ways; Newton–Schulz on the tree and the block tiles
# with ns_product dense / wgmma-unfused / wgmma; an interleaved A/B of the updates; quality.
set -x
export PYTHONPATH=.
python -c "import jax, optax, flax, sys; print(sys.version, jax.__version__, optax.__version__, flax.__version__); print(jax.devices())" > $OUT/versions.txt 2>&1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >> $OUT/versions.txt
date -u >> $OUT/versions.txt
timeout 170 python benchmarks/bench_symmetric.py --impls wgmma --skip-products --ns-products dense,wgmma-unfused,wgmma --iters 10 --out $OUT/sym.json > $OUT/sym.log 2>&1
R="muonbp P=1 defaults;muonbp P=1 ns_product=wgmma-unfused;muonbp P=1 ns_product=dense (XLA matmuls only);muonbp block (1,8) defaults;muonbp block (1,8) ns_product=wgmma-unfused;muonbp block (1,8) ns_product=dense"
timeout 170 python benchmarks/ab_update.py --label call1 --runs "$R" --iters 20 > $OUT/ab.txt 2>&1
timeout 100 python benchmarks/bench_step.py --skip engines,block_engines,wide,updates,strategies,diagnostics,period --out $OUT/quality.json > $OUT/quality.log 2>&1
grep -v "^$" $OUT/sym.log | grep -v "^{" | tail -75; grep -v "^$" $OUT/ab.txt | tail -9; grep -v "^$" $OUT/quality.log | tail -30
