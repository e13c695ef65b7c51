# Device call 2 (2026-12-04), from the repository root with four copies of the package beside
# the working tree (each put first on PYTHONPATH; ab_update prints which one ran):
#   _ab_head        git archive 9c6ad06 muonbp_jax (the previous head)
#   _ab_concatenate one-pass Frobenius norm; shape groups joined by jnp.concatenate
#   _ab_barrier     one-pass norm; each part materialized (optimization_barrier), then concatenated
#   _ab_dus         one-pass norm; parts written into one buffer by dynamic_update_slice
# Two interleaved rounds of benchmarks/ab_update.py, separate processes.
set -x
R="muonbp P=1 defaults;muonbp block (1,8) defaults"
for i in 1 2; do
  for v in head concatenate barrier dus; do
    PYTHONPATH=_ab_$v:. timeout 130 python benchmarks/ab_update.py --label $v$i --runs "$R" --iters 20 > $OUT/call2_ab_$v$i.txt 2>&1
    tail -6 $OUT/call2_ab_$v$i.txt
  done
done
