#!/usr/bin/env bash
# mmsegmentation's test launcher, as DeblurringMAE's README calls it:
#   tools/dist_test.sh CONFIG CHECKPOINT NUM_GPUS --eval mIoU [--data_path DATA]
# Tests CHECKPOINT (written by main_segmentation.py) on the test split; model, input size, classes,
# normalisation and input blur come from the checkpoint. Outputs go next to it (eval_test_*), or --work-dir.
set -euo pipefail
if [ "$#" -lt 3 ]; then
  echo "usage: $0 CONFIG CHECKPOINT NUM_GPUS [--eval mIoU|mDice] [--data_path DATA] [main_segmentation.py flags]" >&2
  exit 2
fi
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
shift 3
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec torchrun --nproc_per_node="$GPUS" --master_port="${PORT:-29500}" \
  "$ROOT/main_segmentation.py" --config "$CONFIG" --resume "$CHECKPOINT" --eval_only --launcher pytorch "$@"
