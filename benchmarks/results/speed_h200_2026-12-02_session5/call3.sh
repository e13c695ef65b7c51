# device call 3 of the fifth pass, from the repository root. The kernel now serves X·Xᴴ products
# only (XXᵀ and R² = R·Rᵀ); the Gram form's products of two different polynomials are XLA's.
# Kernel check (incl. many tiles per program), quality of the defaults with ns_product auto vs
# dense, A/B of the update, the period-5 loop on 16 layers, the 100M training step.
set -x
export PYTHONPATH=.
python -c "import jax, optax, flax, sys; print(sys.version, jax.__version__, optax.__version__, flax.__version__); print(jax.devices())" > $OUT/versions.txt 2>&1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >> $OUT/versions.txt
timeout 100 python benchmarks/bench_symmetric.py --impls wgmma --skip-products --ns-products dense,wgmma --iters 10 --out $OUT/sym.json > $OUT/sym.log 2>&1
timeout 100 python benchmarks/bench_step.py --skip engines,block_engines,wide,updates,strategies,diagnostics,period --out $OUT/quality.json > $OUT/quality.log 2>&1
R="muonbp P=1 defaults;muonbp P=1 ns_product=dense (XLA matmuls only);muonbp block (1,8) defaults;muonbp block (1,8) ns_product=dense"
timeout 90 python benchmarks/ab_update.py --label call3 --runs "$R" --iters 20 > $OUT/ab.txt 2>&1
timeout 130 python benchmarks/bench_period.py --layers 16 --periods 4 --out $OUT/period16.json > $OUT/period16.log 2>&1
T="--compare muonbp,muon,adamw --steps 30 --d-model 1024 --layers 8 --heads 16 --seq 512 --batch 32 --tp-blocks 8 --eval-every 1000 --no-progress"
timeout 150 python examples/train_lm.py $T > $OUT/train_100m.txt 2>&1
grep -v "^$" $OUT/sym.log | tail -30; grep -v "^$" $OUT/quality.log | tail -30; grep -v "^$" $OUT/ab.txt | tail -7; tail -12 $OUT/period16.log; grep "|" $OUT/train_100m.txt
