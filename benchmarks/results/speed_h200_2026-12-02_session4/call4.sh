# device call 4 of this pass, run from the repository root (bash call4.sh); baseline/ = git archive 3f1ec71 muonbp_jax, variant_norms/ = lever 1 only, the working tree (PYTHONPATH=.) = both levers
export PYTHONPATH=.
T="--compare muonbp,muon,adamw --steps 30 --d-model 1024 --layers 8 --heads 16 --seq 512 --batch 32 --tp-blocks 8 --eval-every 1000 --no-progress"
timeout 170 python examples/train_lm.py $T > $OUT/train_100m_stack.txt 2>&1
PYTHONPATH=baseline:. timeout 170 python examples/train_lm.py $T > $OUT/train_100m_base.txt 2>&1
timeout 150 python benchmarks/update_profile.py --top 12 --runs "muonbp P=1 defaults;muonbp block (1,8) defaults" --out $OUT/profile_stack.json > $OUT/profile_stack.log 2>&1
grep "|" $OUT/train_100m_*.txt; grep -A4 "wall ms" $OUT/profile_stack.log; grep -A8 "by total time" $OUT/profile_stack.log
