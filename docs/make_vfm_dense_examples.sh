#!/usr/bin/env bash
# Runs the README's "VisionFM segmentation and landmark decoders" commands as the README writes them, on
# synthetic fundus data at 128 px, and copies their pictures and tables into docs/ (several minutes on 2 CPU
# cores):
#   1. iBOT pretraining of a ViT-Ti/16 on synthetic fundus images (VisionFM's command, shrunk): the encoder whose
#      teacher the decoders freeze (it stands in for VisionFM's VFM_Fundus_weights.pth);
#   2. lesion segmentation (background, exudate, haemorrhage) with the UNETR head, then --load_from --test;
#   3. the same task with the linear head on block maps extracted once (extract_features.py --mode seg);
#   4. landmark detection (optic disc, fovea, field-of-view centre).
#   docs/vfm_seg_overlay.png, docs/vfm_landmark_overlay.png and docs/vfm_dense_results.md (the README's tables).
# PY overrides the interpreter (e.g. PY="nice -n 5 python"); with MEDFOUND_VFM_DENSE_DIR kept from an earlier run
# the pretraining is reused. The decoders use --lr_schedule cosine: at a constant 1e-2 (VisionFM's schedule) the
# UNETR head's last epochs can swing away from a good state, and the saved head is the last epoch's.
set -euo pipefail
cd "$(dirname "$0")/.."
R=$(pwd)
PY=${PY:-python}
Q=${MEDFOUND_VFM_DENSE_DIR:-$(mktemp -d -t medfound_vfm_dense.XXXXXX)}
mkdir -p "$Q"
cd "$Q"
W=./results/pretrain_fundus/checkpoint-last.pth

[ -f $W ] || $PY "$R/evaluation/random_data.py" --task pretrain --dst_dir ./dataset/pretrain_random --num 200 \
  --img_size 64
[ -f $W ] || $PY "$R/main_pretrain.py" --data_path ./dataset/pretrain_random --modality Fundus --norm_last_layer true \
  --epochs 8 --batch_size_per_gpu 16 --shared_head true --out_dim 256 --output_dir ./results \
  --global_crops_scale 0.32 1.0 --pred_ratio 0 0.3 --pred_ratio_var 0 0.2 --name pretrain_fundus \
  --model ibot_vit_tiny_patch16 --patch_out_dim 256 --input_size 64 --lr 5e-4 --warmup_epochs 2

$PY "$R/evaluation/random_data.py" --task segmentation --dst_dir ./dataset/seg_random --num 100 --img_size 128
SEG=(--name single_seg_debug --pretrained_weights $W --input_size 128 --modality Fundus --num_labels 3
     --output_dir ./results --data_path ./dataset/seg_random/VesselSegmentation/ --batch_size_per_gpu 8
     --arch vit_tiny --class_names background exudate haemorrhage)
$PY "$R/evaluation/train_seg_decoder.py" "${SEG[@]}" --epochs 20 --lr 1e-2 --lr_schedule cosine
$PY "$R/evaluation/train_seg_decoder.py" "${SEG[@]}" \
  --load_from ./results/single_seg_debug/checkpoint_teacher_linear.pth --test

$PY "$R/evaluation/extract_features.py" --mode seg --pretrained_weights $W --batch_size_per_gpu 32 \
  --data_path ./dataset/seg_random/VesselSegmentation/ --modality Fundus --dst_root ./dataset/seg_random/FunSegFeat \
  --arch vit_tiny --input_size 128 --epochs 2
$PY "$R/main_vfm_dense.py" --task seg --name seg_linear --data_path ./dataset/seg_random --datasets FunSegFeat \
  --num_labels 3 --class_names background exudate haemorrhage --output_dir ./results --batch_size_per_gpu 32 \
  --epochs 30 --lr 1e-2

$PY "$R/evaluation/random_data.py" --task landmark --dst_dir ./dataset/landmark_random --num 100 --img_size 128
$PY "$R/evaluation/train_landmark_decoder.py" --name train_landmark --pretrained_weights $W --output_dir ./results \
  --data_path ./dataset/landmark_random/LandmarkDetection --batch_size_per_gpu 8 --modality Fundus \
  --arch vit_tiny --input_size 128 --class_names optic_disc fovea fov_centre --epochs 20 --lr 1e-2 --lr_schedule cosine

cp results/single_seg_debug/test_overlays.png "$R/docs/vfm_seg_overlay.png"
cp results/train_landmark/test_overlays.png "$R/docs/vfm_landmark_overlay.png"
$PY - "$R/docs/vfm_dense_results.md" <<'EOF'
import json, sys
def load(run):
    return json.load(open(f"results/{run}/test_metrics.json")), open(f"results/{run}/test_table.md").read()
seg, seg_table = load("single_seg_debug")
lin, lin_table = load("seg_linear")
lm, lm_table = load("train_landmark")
out = [f"Lesion segmentation, UNETR head on the frozen encoder (n = {seg['n']} test images; "
       f"`--load_from --test` reproduced the saved metrics: {seg.get('reproduces_saved_metrics', 'see log')}):", "",
       seg_table, f"VisionFM's Dice (per image, every class): {seg['vfm_dice']:.4f}", "",
       f"Linear head on stored block maps (n = {lin['n']}):", "", lin_table,
       f"Landmarks (n = {lm['n']} test images, {lm['n_points']} points):", "", lm_table]
open(sys.argv[1], "w").write("\n".join(out))
print("\n".join(out))
EOF
