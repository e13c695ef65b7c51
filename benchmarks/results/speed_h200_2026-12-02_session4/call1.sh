# device call 1 of this pass, run from the repository root (bash call1.sh); baseline/ = git archive 3f1ec71 muonbp_jax, variant_norms/ = lever 1 only, the working tree (PYTHONPATH=.) = head 3f1ec71 (no variant)
set -x
export PYTHONPATH=.
python -c "import jax, optax, flax, sys; print(sys.version, jax.__version__, optax.__version__, flax.__version__); print(jax.devices())" > $OUT/versions.txt 2>&1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >> $OUT/versions.txt
XLA_FLAGS="--xla_dump_to=$OUT/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=update" timeout 200 python benchmarks/update_profile.py --top 40 --out $OUT/profile.json > $OUT/profile.log 2>&1
ls $OUT/hlo | head -50 > $OUT/hlo_list.txt; du -sh $OUT/hlo >> $OUT/hlo_list.txt
cd $OUT && tar czf hlo.tgz hlo && rm -rf hlo && cd -
R="muonbp P=1 defaults;muonbp block (1,8) defaults"
for i in 1 2; do
  timeout 100 python benchmarks/ab_update.py --label default-$i --runs "$R" --iters 20 >> $OUT/ab.txt 2>&1
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 100 python benchmarks/ab_update.py --label cmdbuf-off-$i --runs "$R" --iters 20 >> $OUT/ab.txt 2>&1
done
tail -5 $OUT/profile.log; grep -v "^$" $OUT/ab.txt | grep -i "muonbp\|error" | tail -20
