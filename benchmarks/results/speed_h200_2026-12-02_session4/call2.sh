# device call 2 of this pass, run from the repository root (bash call2.sh); baseline/ = git archive 3f1ec71 muonbp_jax, variant_norms/ = lever 1 only, the working tree (PYTHONPATH=.) = lever 1 (batched norms)
export PYTHONPATH=.
R="muonbp P=1 defaults;muonbp block (1,8) defaults"
for i in 1 2; do
  PYTHONPATH=baseline:. timeout 150 python benchmarks/ab_update.py --label base-$i --runs "$R" --iters 20 --donate >> $OUT/ab.txt 2>&1
  timeout 150 python benchmarks/ab_update.py --label batched-norms-$i --runs "$R" --iters 20 --donate >> $OUT/ab.txt 2>&1
done
timeout 200 python benchmarks/update_profile.py --top 12 --runs "$R" --out $OUT/profile.json > $OUT/profile.log 2>&1
grep -B2 -A4 "wall ms" $OUT/profile.log | head; grep -i "muonbp\|error\|Traceback" $OUT/ab.txt | sort | uniq
