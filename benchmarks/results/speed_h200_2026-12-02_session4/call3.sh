# device call 3 of this pass, run from the repository root (bash call3.sh); baseline/ = git archive 3f1ec71 muonbp_jax, variant_norms/ = lever 1 only, the working tree (PYTHONPATH=.) = both levers
export PYTHONPATH=.
R="muonbp P=1 defaults;muonbp block (1,8) defaults"
ab() { PYTHONPATH=$1:. timeout 120 python benchmarks/ab_update.py --label $2 --runs "$R" --iters 20 >> $OUT/ab.txt 2>&1; }
ab baseline base-1; ab . stack-1; ab variant_norms norms-1; ab . stack-2; ab baseline base-2
PYTHONPATH=.:. timeout 150 python benchmarks/bench_period.py --layers 16 --periods 4 --out $OUT/period16_stack.json > $OUT/period16_stack.log 2>&1
PYTHONPATH=baseline:. timeout 150 python benchmarks/bench_period.py --layers 16 --periods 4 --out $OUT/period16_base.json > $OUT/period16_base.log 2>&1
grep -i "muonbp\|error\|Traceback" $OUT/ab.txt | sort | uniq; tail -8 $OUT/period16_stack.log $OUT/period16_base.log
