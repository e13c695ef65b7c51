# device call 2 of the seventh pass, from the repository root, with the previous head's package
# in _ab_head/ as in call 1. (Both bench_period runs below hit their 170 s limit and printed
# nothing.)
# 1. The 100M training step (the example's flags), MuonBP with its kind picked on the host (the
#    example's new default, --switch host) and by lax.cond (--switch cond), and AdamW.
# 2. The period-5 loop on 16 layers (block step, full step, lax.cond, full_step=, a cond of the
#    block update with itself): tall matrices iterated as they are, then the previous head.
set -x
export PYTHONPATH=.
{ python -c "import jax, optax, flax, sys; print(sys.version, jax.__version__, optax.__version__, flax.__version__); print(jax.devices())"; nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv; date -u; } > $OUT/env.txt 2>&1
T="--steps 30 --d-model 1024 --layers 8 --heads 16 --seq 512 --batch 32 --tp-blocks 8 --eval-every 1000 --no-progress"
timeout 130 python examples/train_lm.py --compare muonbp,adamw $T --switch host --out $OUT/runs_host > $OUT/train_100m_host.txt 2>&1
timeout 90 python examples/train_lm.py --compare muonbp $T --switch cond --out $OUT/runs_cond > $OUT/train_100m_cond.txt 2>&1
rm -rf $OUT/runs_host $OUT/runs_cond
timeout 170 python benchmarks/bench_period.py --layers 16 --periods 2 --out $OUT/period16_new.json > $OUT/period16_new.log 2>&1
PYTHONPATH=_ab_head:. timeout 170 python benchmarks/bench_period.py --layers 16 --periods 2 --out $OUT/period16_head.json > $OUT/period16_head.log 2>&1
cat $OUT/env.txt; grep "|" $OUT/train_100m_host.txt $OUT/train_100m_cond.txt; tail -9 $OUT/period16_new.log; tail -9 $OUT/period16_head.log
