# device call 3 of the sixth pass, from the repository root, at the committed defaults: bench_step's
# updates side by side (optax muon, adamw, every muonbp configuration; call 2's full run timed out
# in this section) and the period-5 loop on 16 layers (call 2's timed out too), with longer limits.
set -x
export PYTHONPATH=.
python -c "import jax, optax, flax, sys; print(sys.version, jax.__version__, optax.__version__, flax.__version__); print(jax.devices())" > $OUT/versions.txt 2>&1
date -u >> $OUT/versions.txt
timeout 230 python benchmarks/bench_step.py --iters 10 --skip engines,block_engines,wide,quality,strategies,diagnostics,period --out $OUT/updates.json > $OUT/updates.log 2>&1
timeout 170 python benchmarks/bench_period.py --layers 16 --periods 2 --out $OUT/period16.json > $OUT/period16.log 2>&1
tail -40 $OUT/updates.log; tail -10 $OUT/period16.log
