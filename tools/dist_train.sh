#!/usr/bin/env bash
# mmsegmentation's launcher, as DeblurringMAE's README calls it:
#   tools/dist_train.sh CONFIG NUM_GPUS --work-dir DIR --options model.pretrained=CKPT [more flags]
# CONFIG is an mmseg config name (a preset of main_segmentation.py; the configs/<folder>/ prefix and .py are
# accepted); every further argument goes to main_segmentation.py unchanged. PORT as in mmseg (default 29500).
set -euo pipefail
if [ "$#" -lt 2 ]; then
  echo "usage: $0 CONFIG NUM_GPUS [--work-dir DIR] [--options model.pretrained=CKPT] [main_segmentation.py flags]" >&2
  exit 2
fi
CONFIG=$1
GPUS=$2
shift 2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec torchrun --nproc_per_node="$GPUS" --master_port="${PORT:-29500}" \
  "$ROOT/main_segmentation.py" --config "$CONFIG" --launcher pytorch "$@"
