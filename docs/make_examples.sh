#!/usr/bin/env bash
# Runs the README quickstart exactly as the README writes it and copies its pictures into docs/:
#   main_pretrain.py --demo, then random_data.py -> main_pretrain.py -> main_finetune.py -> --eval -> --predict
#   -> explain.py -> visualize_mae.py -> embed_features.py
# and writes docs/quickstart_results.md (wall time of every step, test AUROC, disk used), whose figures the
# README quotes. About 10 minutes on 2 CPU cores.
#   docs/demo_reconstructions.png   main_pretrain.py --demo (reconstructions.png)
#   docs/quickstart_data.png        random_data.py --preview (synthetic ultrasound, class_1 = 2-3 lesions)
#   docs/quickstart_roc.png         main_finetune.py (roc_test.png)
#   docs/example_reconstruction.png visualize_mae.py: the demo's MAE on scikit-image's retina photo
#   docs/example_rollout.png        explain.py --method rollout, same image
#   docs/example_chefer.png         explain.py --method chefer, same image, class "class_1" (lesions)
#   docs/example_embedding.png      embed_features.py --method tsne on the test split
set -euo pipefail
cd "$(dirname "$0")/.."
R=$(pwd)
Q=${MEDFOUND_QUICKSTART_DIR:-$(mktemp -d -t medfound_quickstart.XXXXXX)}
mkdir -p "$Q"
RESULTS=docs/quickstart_results.md
TIMES="$Q/times.txt"
: > "$TIMES"

step() {  # step NAME COMMAND...: run it as the README shows it, record its wall time
    local name=$1; shift
    echo "+ $*"
    local t0=$SECONDS
    "$@"
    echo "$name $((SECONDS - t0))" >> "$TIMES"
}

cd "$Q"  # the README's commands, run from a scratch folder (R = the repository)
step demo     python "$R/main_pretrain.py" --demo --output_dir qs/demo
step data     python "$R/random_data.py" --kind ultrasound --size 32 --n_per_class 150 --output_dir qs/data \
    --preview qs/data_preview.png
STEM=$(ls qs/data/test/class_1 | head -n 1); STEM=${STEM%.png}
IMG=qs/data/test/class_1/$STEM.png  # a held-out image with lesions
step pretrain python "$R/main_pretrain.py" --model mae_vit_micro_patch8 --input_size 32 --data_path qs/data \
    --epochs 30 --warmup_epochs 3 --batch_size 16 --blr 1e-2 --output_dir qs/pretrain
step finetune python "$R/main_finetune.py" --model vit_micro_patch8 --finetune qs/pretrain/checkpoint-last.pth \
    --data_path qs/data --epochs 40 --output_dir qs/finetune
step eval     python "$R/main_finetune.py" --eval --resume qs/finetune/checkpoint-best.pth --data_path qs/data \
    --output_dir qs/eval
step predict  python "$R/main_finetune.py" --predict qs/data/test/class_1 --resume qs/finetune/checkpoint-best.pth \
    --output_dir qs/predict
step explain  python "$R/explain.py" --checkpoint qs/finetune/checkpoint-best.pth --method rollout chefer \
    --class_index class_1 --output_dir qs/explain "$IMG"
step mae      python "$R/visualize_mae.py" --checkpoint qs/demo/checkpoint-last.pth --output_dir qs/mae \
    qs/demo/demo_data/images/retina_skimage.png
step embed    python "$R/embed_features.py" --checkpoint qs/finetune/checkpoint-best.pth --data_path qs/data \
    --split test --method tsne --output_dir qs/embedding

cp qs/demo/reconstructions.png "$R/docs/demo_reconstructions.png"
cp qs/data_preview.png "$R/docs/quickstart_data.png"
cp qs/finetune/roc_test.png "$R/docs/quickstart_roc.png"
cp qs/mae/retina_skimage_mae.png "$R/docs/example_reconstruction.png"
cp qs/explain/${STEM}_rollout.png "$R/docs/example_rollout.png"
cp qs/explain/${STEM}_chefer_class_1.png "$R/docs/example_chefer.png"
cp qs/embedding/embedding_tsne.png "$R/docs/example_embedding.png"

python - "$TIMES" "$R/$RESULTS" <<'EOF'
import json, os, subprocess, sys
times = dict(line.split() for line in open(sys.argv[1]))
res = json.load(open("qs/finetune/results.json"))
ev = json.load(open("qs/eval/eval_test_metrics.json"))
du = lambda p: subprocess.run(["du", "-sm", p], capture_output=True, text=True).stdout.split()[0]
t = res["test"]
lines = ["| step | wall time (s) |", "|---|---|"] + [f"| {k} | {v} |" for k, v in times.items()]
lines += ["", f"- finetuning recipe: {res['recipe']}, best epoch {res['best_epoch']} "
              f"(val auroc {res['best_val']:.3f}), training {res['train_time_s']:.0f} s",
          f"- test AUROC {t['auroc']:.3f} (95% CI {t['ci95']['auroc'][0]:.3f}-{t['ci95']['auroc'][1]:.3f}), "
          f"accuracy {t['accuracy']:.3f}, n = {t['n']}; --eval from the checkpoint alone: AUROC {ev['auroc']:.3f}",
          f"- warnings: {res['warnings'] or 'none'}",
          f"- disk: demo folder {du('qs/demo')} MB (demo data included), pretraining folder {du('qs/pretrain')} MB, "
          f"finetuning folder {du('qs/finetune')} MB"]
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
ls -l "$R"/docs/*.png
