#!/usr/bin/env bash
# Runs the README's linear-probe commands for image-text models as the README writes them, on synthetic data
# (a few minutes on 2 CPU cores), and writes docs/slip_probe_results.md (the README's table):
#   1. CLIP_VIT_MICRO pretrained on synthetic image-caption pairs (captions name the colour and shape drawn);
#   2. linear probe (MAE's: frozen encoder, BatchNorm + linear head, LARS) of its vision tower through
#      main_finetune.py --model_key state_dict --model_prefix module.visual., and of a random-init tower;
#   3. MedSLIP's CBIS probe command (--recipe medslip_cbis and medslip_cbis_compat) on synthetic CBIS-like CSVs,
#      on the same tower (--modeltype slip) and on a random-init one.
set -euo pipefail
cd "$(dirname "$0")/.."
R=$(pwd)
export PYTHONPATH="$R${PYTHONPATH:+:$PYTHONPATH}"
Q=${MEDFOUND_SLIP_PROBE_DIR:-$(mktemp -d -t medfound_slip_probe.XXXXXX)}
mkdir -p "$Q"
cd "$Q"
CPU=(--device cpu --num_workers 0)

python -m util.captions demo
# labelled images of the same 9 colour x shape classes: probe/train (20 per class), probe/test (12 per class)
python -c "from util.captions import write_synthetic_zeroshot as w; w('probe_a', 20, 32, seed=2); w('probe_b', 12, 32, seed=3)"
rm -rf probe && mkdir probe && mv probe_a/test probe/train && mv probe_b/test probe/test && rm -rf probe_a probe_b

python "$R/main_slip.py" --dataset roco --root demo --metadata demo/train.txt --model CLIP_VIT_MICRO \
  --input-size 32 --batch-size 20 --epochs 10 --lr 1e-3 --wd 0.05 --device cpu --output-dir runs/clip_demo

LP=(--linprobe --model vit_micro_patch8 --cls_token --data_path probe --input_size 32 --batch_size 16 --lr 1.0
    --epochs 100 --aa none --reprob 0 "${CPU[@]}")
python "$R/main_finetune.py" "${LP[@]}" --finetune runs/clip_demo/checkpoint-last.pth --model_key state_dict \
  --model_prefix module.visual. --output_dir runs/probe_clip
python "$R/main_finetune.py" "${LP[@]}" --output_dir runs/probe_random

python -m util.synthetic_cbis cbis --size 64   # cbis/train_calcification.csv, cbis/test_calcification.csv, cbis/images/
python -c "import torch, models_slip; from util.registry import create_model as c; torch.manual_seed(0); \
m = c('CLIP_VIT_MICRO', img_size=32); torch.save({'state_dict': {'module.' + k: v for k, v in m.state_dict().items()}, \
'args': {'model': 'CLIP_VIT_MICRO'}}, 'random_clip.pt')"
for RECIPE in medslip_cbis medslip_cbis_compat; do
  for TOWER in clip:runs/clip_demo/checkpoint-last.pth random:random_clip.pt; do
    python "$R/linear_probing_on_CBIS/linear_probe_CBIS_MedSLIP.py" --seed 77 --batchsize 16 --pretrain_epoch 10 \
      --path "runs/cbis_$RECIPE/${TOWER%%:*}" --modeltype slip --ipath "${TOWER#*:}" --epochs 15 --data_path cbis \
      --input_size 64 --recipe "$RECIPE" "${CPU[@]}"
  done
done

python - "$R/docs/slip_probe_results.md" <<'EOF'
import glob, json, sys

def row(name, path):
    r = json.load(open(glob.glob(path)[0]))
    t, ci = r["test"], r["test"].get("ci95", {})
    band = lambda k: f"{t[k]:.3f} ({ci[k][0]:.2f}-{ci[k][1]:.2f})" if k in ci else f"{t[k]:.3f}"
    extra = f" | {t['malignant_pr']['precision']:.3f} | {t['malignant_pr']['recall']:.3f}" if "malignant_pr" in t else " | - | -"
    return (f"| {name} | {band('auroc')} | {band('balanced_accuracy')} | {t['f1']:.3f} | {t['precision']:.3f} | "
            f"{t['recall']:.3f}{extra} | {r['best_epoch']} | {r['train_time_s']:.0f} s |")

lines = ["| run | test AUROC (95% CI) | balanced accuracy (95% CI) | F1 | precision | recall | precision (malignant) "
         "| recall (malignant) | epoch tested | train time |", "|---|---|---|---|---|---|---|---|---|---|"]
lines += [row("colour x shape (9 classes), linear probe, CLIP-pretrained tower", "runs/probe_clip/results.json"),
          row("colour x shape (9 classes), linear probe, random-init tower", "runs/probe_random/results.json")]
for recipe in ("medslip_cbis", "medslip_cbis_compat"):
    lines.append(row(f"synthetic CBIS (3 classes), {recipe}, CLIP-pretrained tower",
                     f"runs/cbis_{recipe}/clip/*/results.json"))
    lines.append(row(f"synthetic CBIS (3 classes), {recipe}, random-init tower",
                     f"runs/cbis_{recipe}/random/*/results.json"))
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
