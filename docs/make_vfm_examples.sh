#!/usr/bin/env bash
# Runs the README's "VisionFM decoders" commands as the README writes them, on synthetic data at 64 px, and
# copies their pictures into docs/ (a few minutes on 2 CPU cores):
#   1. iBOT pretraining of a micro ViT on synthetic fundus images (VisionFM's command, shrunk): the encoder
#      whose teacher the decoders below freeze (it stands in for VisionFM's VFM_<Modality>_weights.pth);
#   2. single-label DR grading on images; 3. 13-label multi-modal classification on Fundus + OCT features;
#   4. 38 biomarkers on Fundus + External features; 5. progression forecasting on images + days.
#   docs/vfm_single_cls_roc.png, docs/vfm_multi_cls_roc.png, docs/vfm_metric_reg_scatter.png,
#   docs/vfm_forecasting_roc.png, and docs/vfm_results.md (the README's results table).
set -euo pipefail
cd "$(dirname "$0")/.."
R=$(pwd)
Q=${MEDFOUND_VFM_DIR:-$(mktemp -d -t medfound_vfm.XXXXXX)}
mkdir -p "$Q"
cd "$Q"
ENC=(--arch vit_micro --patch_size 8 --input_size 64 --n_last_blocks 2)
W=./results/pretrain_fundus/checkpoint-last.pth

python "$R/evaluation/random_data.py" --task pretrain --dst_dir ./dataset/pretrain_random --num 200 --img_size 64
python "$R/main_pretrain.py" --data_path ./dataset/pretrain_random --modality Fundus --norm_last_layer true \
  --epochs 10 --batch_size_per_gpu 16 --shared_head true --out_dim 256 --output_dir ./results \
  --global_crops_scale 0.32 1.0 --pred_ratio 0 0.3 --pred_ratio_var 0 0.2 --name pretrain_fundus \
  --model ibot_vit_micro_patch8 --patch_out_dim 256 --input_size 64 --lr 5e-4 --warmup_epochs 2

python "$R/evaluation/random_data.py" --task single_cls --dst_dir ./dataset/single_cls_random --num 200 --img_size 64
python "$R/evaluation/train_cls_decoder.py" --name single_cls_debug --pretrained_weights $W --output_dir ./results \
  --data_path ./dataset/single_cls_random/FundusClassification --num_labels 5 --batch_size_per_gpu 32 --epochs 30 \
  "${ENC[@]}"

python "$R/evaluation/random_data.py" --task multi_cls --dst_dir ./dataset/multi_cls_random --num 200 --img_size 64
for M in Fundus OCT; do
  python "$R/evaluation/extract_features.py" --pretrained_weights $W --batch_size_per_gpu 64 \
    --data_path ./dataset/multi_cls_random/${M}ClassificationMulti/ --modality $M \
    --dst_root ./dataset/multi_cls_random/${M/Fundus/Fun}ClsFeat/ "${ENC[@]}" --epochs 2
done
python "$R/evaluation/train_cls_multi_decoder.py" --name train_debug --output_dir ./results \
  --datasets FunClsFeat OCTClsFeat --data_path ./dataset/multi_cls_random/ --batch_size_per_gpu 8192

python "$R/evaluation/random_data.py" --task metric_reg --dst_dir ./dataset/metric_random --num 200 --img_size 64
for M in Fundus External; do
  python "$R/evaluation/extract_features.py" --pretrained_weights $W --batch_size_per_gpu 64 \
    --data_path ./dataset/metric_random/${M}Regression/ --modality $M \
    --dst_root ./dataset/metric_random/${M/Fundus/Fun}RegFeat/ "${ENC[@]}" --epochs 2
done
python "$R/evaluation/train_metric_reg_multi_decoder.py" --name train_metric_reg_multi --output_dir ./results \
  --datasets FunRegFeat ExternalRegFeat --data_path ./dataset/metric_random/ --batch_size_per_gpu 4096

python "$R/evaluation/random_data.py" --task forecasting --dst_dir ./dataset/glaucoma_forecasting --num 200 --img_size 64
python "$R/evaluation/train_forecasting_decoder.py" --data_path ./dataset/glaucoma_forecasting/ \
  --pretrained_weights $W --avgpool_patchtokens 1 --checkpoint_key teacher \
  --output_dir ./results/glaucoma_forecasting --num_labels 2 --lr 0.05 --batch_size_per_gpu 32 --epochs 30 \
  --arch vit_micro --patch_size 8 --input_size 64

find ./results -name "*.png" | sort
cp results/single_cls_debug/test_roc.png "$R/docs/vfm_single_cls_roc.png"
cp results/train_debug/test_roc.png "$R/docs/vfm_multi_cls_roc.png"
cp results/train_metric_reg_multi/test_scatter.png "$R/docs/vfm_metric_reg_scatter.png"
cp "$(find results/glaucoma_forecasting -name test_roc.png | head -n 1)" "$R/docs/vfm_forecasting_roc.png"

python - "$R/docs/vfm_results.md" <<'EOF'
import glob, json, sys
def metrics(pattern):
    return json.load(open(sorted(glob.glob(pattern, recursive=True))[0]))
rows = [("single-label, 5 DR grades", "Fundus images", "results/single_cls_debug/test_metrics.json"),
        ("multi-label, 13 labels", "Fundus + OCT features", "results/train_debug/test_metrics.json"),
        ("38 biomarkers", "Fundus + External features", "results/train_metric_reg_multi/test_metrics.json"),
        ("forecasting", "Fundus images + days", "results/glaucoma_forecasting/**/test_metrics.json")]
lines = ["| task | inputs | test metrics (95% CI) |", "|---|---|---|"]
for task, inputs, pattern in rows:
    m = metrics(pattern)
    ci = m.get("ci95", {})
    def fmt(k):
        v = m.get(k)
        if not isinstance(v, (int, float)):
            return None
        lo_hi = ci.get(k)
        return f"{k} {v:.3f}" + (f" [{lo_hi[0]:.3f}-{lo_hi[1]:.3f}]" if lo_hi else "")
    if "auroc" in m:
        text = ", ".join(x for x in map(fmt, ("auroc", "auprc", "accuracy", "f1")) if x)
    else:  # the synthetic biomarkers that follow what the image shows, then the macro figures over all 38
        r2 = dict(zip(m["target_names"], m["r2_per_target"]))
        text = ("R² " + ", ".join(f"{k} {r2[k]:.2f}" for k in ("HGB", "HCT", "RBC") if k in r2) +
                f" (image-linked); macro over 38: {fmt('r2')}, {fmt('mae')}; {m.get('missing')} missing values left out")
    lines.append(f"| {task} | {inputs} | {text} (n = {m.get('n')}) |")
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
