# device call 2 of the sixth pass, from the repository root, at the committed defaults (the
# kernel with the polynomial in its epilogue): bench_step in full (every configuration, optax
# muon and adamw, the ceiling, quality, block step), the period-5 loop on 16 layers, and the
# 100 M training step.
set -x
export PYTHONPATH=.
python -c "import jax, optax, flax, sys; print(sys.version, jax.__version__, optax.__version__, flax.__version__); print(jax.devices())" > $OUT/versions.txt 2>&1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >> $OUT/versions.txt
date -u >> $OUT/versions.txt
timeout 270 python benchmarks/bench_step.py --skip quality,diagnostics --out $OUT/bench_step.json > $OUT/bench_step.log 2>&1
timeout 110 python benchmarks/bench_period.py --layers 16 --periods 3 --out $OUT/period16.json > $OUT/period16.log 2>&1
T="--compare muonbp,muon,adamw --steps 30 --d-model 1024 --layers 8 --heads 16 --seq 512 --batch 32 --tp-blocks 8 --eval-every 1000 --no-progress"
timeout 150 python examples/train_lm.py $T > $OUT/train_100m.txt 2>&1
tail -100 $OUT/bench_step.log; tail -10 $OUT/period16.log; grep "|" $OUT/train_100m.txt
