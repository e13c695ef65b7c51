# Device call 4 (2026-12-04): the 100M training step (the example's flags, --switch host, its
# default), MuonBP, Muon and AdamW with the new code, then MuonBP with the previous head's
# package (_ab_head/, git archive 9c6ad06 muonbp_jax, first on PYTHONPATH).
set -x
export PYTHONPATH=.
T="--steps 30 --d-model 1024 --layers 8 --heads 16 --seq 512 --batch 32 --tp-blocks 8 --eval-every 1000 --no-progress"
timeout 190 python examples/train_lm.py --compare muonbp,muon,adamw $T --out $OUT/runs_new > $OUT/call4_train_100m_new.txt 2>&1
# (A check here with `python -c` printed the working tree: -c puts the current directory before
# PYTHONPATH. A script, like the example below, has its own folder first and then _ab_head.)
PYTHONPATH=_ab_head:. timeout 80 python examples/train_lm.py --compare muonbp $T --out $OUT/runs_head > $OUT/call4_train_100m_head.txt 2>&1
rm -rf $OUT/runs_new $OUT/runs_head
grep "|" $OUT/call4_train_100m_new.txt $OUT/call4_train_100m_head.txt
