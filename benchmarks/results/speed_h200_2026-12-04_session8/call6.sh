# Device call 6 (2026-12-04): the stacking buffer allocated with jnp.empty (uninitialized from
# jax 0.11: an AllocateBuffer, no fill) against jnp.zeros (call 5's profile: the zero fill ran
# as 3 loop_pad_fusion kernels, 1.3 ms). Working tree = jnp.empty; _ab_zeros/ = git archive
# bd6c5ff muonbp_jax (jnp.zeros), first on PYTHONPATH.
set -x
export PYTHONPATH=.
R="muonbp P=1 defaults;muonbp block (1,8) defaults"
timeout 80 python benchmarks/ab_update.py --label empty1 --runs "$R" --iters 20 > $OUT/call6_ab_empty1.txt 2>&1
PYTHONPATH=_ab_zeros:. timeout 80 python benchmarks/ab_update.py --label zeros1 --runs "$R" --iters 20 > $OUT/call6_ab_zeros1.txt 2>&1
timeout 80 python benchmarks/ab_update.py --label empty2 --runs "$R" --iters 20 > $OUT/call6_ab_empty2.txt 2>&1
for f in $OUT/call6_ab_*.txt; do grep -v "^---\|^variant  \|^$" $f | tail -3; done
