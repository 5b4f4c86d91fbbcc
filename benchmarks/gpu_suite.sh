#!/usr/bin/env bash
# The reference GPU measurements as one scripted run (about 6-8 minutes on one H100/H200):
# MAE-B/16 and MAE-L/16 pretraining, ViT-B/16 finetuning, each fast configuration against the plain
# baseline in the same process, MFU against the spec peak and the measured matmul peak; then the
# end-to-end rate from generated 512-px JPEGs and from a pre-decoded cache, and a ViT-L step with
# activation checkpointing at a large batch. Every result is a JSON file under $OUT (default ./bench_out).
#
#   bash benchmarks/gpu_suite.sh                 # all of it
#   OUT=/tmp/b STEPS=10 bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./bench_out}
STEPS=${STEPS:-20}
mkdir -p "$OUT"
status=0
run() {  # name, then main_benchmark.py flags; a failing configuration does not stop the others
  local name=$1; shift
  echo "=== $name: python main_benchmark.py $*"
  if ! python main_benchmark.py --device cuda --steps "$STEPS" --json "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.log"; then
    status=1
  fi
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
run mae_b_pretrain       --model mae_vit_base_patch16  --batch_size 256 --compile --ablation
run mae_l_pretrain       --model mae_vit_large_patch16 --batch_size 128 --compile
run vit_b_finetune       --model vit_base_patch16 --mode finetune --batch_size 128 --compile
run mae_l_gradckpt_b512  --model mae_vit_large_patch16 --batch_size 512 --grad_ckpt --compile --skip_baseline
run mae_b_files_512px    --model mae_vit_base_patch16  --batch_size 256 --compile --skip_baseline --data files \
                         --gen_images 2048 --gen_size 512 --num_workers 14 --pipeline_images 96
echo "results in $OUT"
exit $status
