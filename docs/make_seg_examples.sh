#!/usr/bin/env bash
# Runs the README's "Segmentation finetuning (UPerNet, DeblurringMAE's TN3K recipe)" commands as the README writes
# them, shrunk to CPU sizes (64 px synthetic nodule scans, micro ConvViT), and regenerates their outputs:
#   1. synthetic TN3K-like data in the mmseg layout (random_data.py --task us_segmentation);
#   2. deblurring ConvMAE pretraining of a micro ConvViT on its training images (blur recorded in the checkpoint);
#   3. the TN3K command (tools/dist_train.sh with the deblurring config) on that checkpoint;
#   4. the vanilla ConvMAE config from scratch (no pretraining) on the same data, for comparison;
#   5. tools/dist_test.sh on the deblurring run's best checkpoint (reproduces its test metrics).
# Writes docs/seg_tn3k_overlay.png (test overlay of step 5) and docs/seg_results.md (the README's table).
# About 5 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
R=$(pwd)
Q=${MEDFOUND_SEG_DIR:-$(mktemp -d -t medfound_seg.XXXXXX)}
mkdir -p "$Q"
cd "$Q"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-}
SHRINK=(--model convvit_micro_patch16 --input_size 64 --max_iters 600 --batch_size 8 --lr 1e-3 --channels 64
        --device cpu --num_workers 0)
DE=configs/de_convmae/upernet_de_convmae_us280k_base_gaussian_800_512_tn3k.py
VANILLA=configs/convmae/upernet_convmae_us280k_base_800_512_tn3k.py

python "$R/random_data.py" --task us_segmentation --layout mmseg --dst_dir ./data/tn3k --num 100 --img_size 64
python "$R/main_pretrain.py" --model dconvmae_convvit_micro_patch16 --blur gaussian --sigma 1.1 --input_size 64 \
  --data_path ./data/tn3k/images/train --epochs 40 --warmup_epochs 4 --batch_size 16 --blr 1e-2 \
  --output_dir ./pretrain_dconvmae --device cpu --num_workers 0
PORT=29511 "$R/tools/dist_train.sh" $DE 1 --work-dir ./work_dirs/de_tn3k \
  --options model.pretrained=./pretrain_dconvmae/checkpoint-last.pth --data_path ./data/tn3k "${SHRINK[@]}"
PORT=29512 "$R/tools/dist_train.sh" $VANILLA 1 --work-dir ./work_dirs/scratch_tn3k --data_path ./data/tn3k \
  "${SHRINK[@]}"
PORT=29513 "$R/tools/dist_test.sh" $DE ./work_dirs/de_tn3k/checkpoint-best.pth 1 --eval mIoU \
  --data_path ./data/tn3k --device cpu --num_workers 0

cp ./work_dirs/de_tn3k/eval_test_overlay.png "$R/docs/seg_tn3k_overlay.png"
python - "$R/docs/seg_results.md" <<'EOF'
import json, sys
rows = [("Deblurring ConvMAE (micro, synthetic pretraining)", "work_dirs/de_tn3k/eval_test_metrics.json"),
        ("ConvMAE config, no pretraining", "work_dirs/scratch_tn3k/test_metrics.json")]
out = ["| Method | Architecture | Pretraining | nodule IoU (%) | nodule Acc (%) | nodule Dice (%) | mIoU (%) [95% CI] |",
       "|---|---|---|---|---|---|---|"]
for name, path in rows:
    m = json.load(open(path))
    lo, hi = m["mIoU_ci"]
    pre = "synthetic US (40 ep)" if "de_" in path else "none"
    out.append(f"| {name} | UPerNet(ConvViT-micro) | {pre} | {100 * m['iou_per_class'][1]:.2f} | "
               f"{100 * m['acc_per_class'][1]:.2f} | {100 * m['dice_per_class'][1]:.2f} | "
               f"{100 * m['mIoU']:.2f} [{100 * lo:.2f}, {100 * hi:.2f}] |")
table = open("work_dirs/de_tn3k/eval_test_table.md").read()
open(sys.argv[1], "w").write("\n".join(out) + "\n\nDeblurring run, `tools/dist_test.sh` table:\n\n" + table)
print(open(sys.argv[1]).read())
EOF
