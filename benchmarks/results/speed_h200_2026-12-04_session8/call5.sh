# Device call 5 (2026-12-04): the profile of call 1 again with the new code (working tree):
# where the block step's and P=1's time goes after the in-place stacking.
set -x
export PYTHONPATH=.
timeout 200 python benchmarks/update_profile.py --top 40 --runs "muonbp P=1 defaults;muonbp block (1,8) defaults" --out $OUT/call5_profile.json > $OUT/call5_profile.log 2>&1
head -8 $OUT/call5_profile.log
