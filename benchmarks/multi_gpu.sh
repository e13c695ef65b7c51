#!/usr/bin/env bash
# Issue 7: MuonBP vs Muon vs AdamW with real NCCL collectives, tensor parallel across every GPU
# of one host. Run on a machine of several GPUs (device tool: nvidia-h200-x2/-x4/-x8), e.g.
#   OUT=$OUT bash benchmarks/multi_gpu.sh
# Writes bench_sharded.json/.txt, one folder per flagship run, and cost_model/ under $OUT.
# Not yet run: no machine of several GPUs was lent when it was written (see RESULTS.md).
set -euo pipefail
# NVLink multicast stays off on the lent machines (shared GPUs; see the device tool's KINDS.md).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
OUT="${OUT:-runs/multi_gpu}"
STEPS="${STEPS:-300}"
mkdir -p "$OUT"
n=$(python -c "import jax; print(jax.device_count())")
nvidia-smi -L | tee "$OUT/devices.txt"
python -c "import jax, optax, flax; print('jax', jax.__version__, 'optax', optax.__version__,
'flax', flax.__version__)" | tee -a "$OUT/devices.txt"

# Optimizer updates alone: block step, full step per strategy, AdamW; collectives and bytes
# from the compiled HLO.
python benchmarks/bench_sharded.py --mesh "1x$n" --out "$OUT/bench_sharded.json" \
  | tee "$OUT/bench_sharded.txt"

# The flagship model, tensor parallel over all GPUs (real shard_map blocks, no emulation).
model=(--mesh "1x$n" --tp-blocks "$n" --d-model 1024 --layers 8 --heads 16 --seq 256
       --batch 32 --steps "$STEPS" --eval-every 100 --checkpoint-every 100000 --no-progress)
for strategy in gather all_to_all auto; do
  python examples/train_lm.py --compare muonbp --full-strategy "$strategy" "${model[@]}" \
    --out "$OUT/muonbp_$strategy"
done
for strategy in gather all_to_all; do
  python examples/train_lm.py --compare muon --full-strategy "$strategy" "${model[@]}" \
    --out "$OUT/muon_$strategy"
done
python examples/train_lm.py --compare adamw "${model[@]}" --out "$OUT/adamw"
find "$OUT" -name checkpoints -type d -prune -exec rm -rf {} +

# The cost model's prediction for the same layout, to set beside the measurements.
python benchmarks/cost_model.py --models bench4l --tp "$n" --out "$OUT/cost_model" \
  | tee "$OUT/cost_model.txt" || echo "cost model: see benchmarks/cost_model.py --help"
