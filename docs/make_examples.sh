#!/usr/bin/env bash
# Regenerates the README's example pictures docs/example_*.png on CPU (about 10-15 minutes on 2 cores):
# tiny models trained on synthetic images and scikit-image's fundus photograph, then the scripts.
#   docs/example_reconstruction.png  visualize_mae.py, mae_vit_tiny_patch8 (64 px) trained ~2000 steps
#   docs/example_rollout.png         explain.py --method rollout, a vit_micro_patch8 (96 px) lesion detector
#   docs/example_chefer.png          explain.py --method chefer, same model, class "lesion"
#   docs/example_embedding.png       embed_features.py --method tsne, same model, 200 held-out images
set -euo pipefail
cd "$(dirname "$0")/.."
W=${MEDFOUND_EXAMPLES_DIR:-$(mktemp -d -t medfound_examples.XXXXXX)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$W"
python - "$W" <<'EOF'
import os
import sys

from PIL import Image

from util.tiny import (demo_pretraining_images, plant_lesion, planted_lesion_images, retina_photo,
                       save_classifier, save_mae, train_classifier, train_mae)

w = sys.argv[1]
photo = retina_photo(512)  # scikit-image's fundus photograph
Image.fromarray(photo).save(f"{w}/retina.png")
# the photograph with one planted "lesion" (a bright round spot), for the explanation pictures
Image.fromarray(plant_lesion(photo, (0.66, 0.36), 0.045)[0]).save(f"{w}/retina_lesion.png")

# MAE on synthetic fundus images + random crops of the photograph
mae = train_mae(demo_pretraining_images(768, 64, seed=0), model_name="mae_vit_tiny_patch8", steps=2000,
                lr=1.5e-3)
save_mae(mae, f"{w}/mae.pth", "mae_vit_tiny_patch8")

# a ViT that detects a planted lesion in crops of the photograph (label 1 = lesion present)
data = planted_lesion_images(600, 96, seed=0, background=photo, radius=(0.05, 0.10))
clf = train_classifier(data["images"], data["labels"], pool="cls", steps=600, seed=0)
save_classifier(clf, f"{w}/classifier.pth", "vit_micro_patch8", ["no_lesion", "lesion"])
test = planted_lesion_images(200, 96, seed=2, background=photo, radius=(0.05, 0.10))
for i, (img, label) in enumerate(zip(test["images"], test["labels"])):
    folder = f"{w}/data/test/{['no_lesion', 'lesion'][label]}"
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(img).save(f"{folder}/{i:03d}.png")
EOF
python visualize_mae.py --checkpoint "$W/mae.pth" --mask_ratio 0.75 --seed 2 --output_dir "$W/mae" "$W/retina.png"
python explain.py --checkpoint "$W/classifier.pth" --method rollout chefer --class_index lesion --overlay_size 256 \
    --output_dir "$W/explanations" "$W/retina_lesion.png"
python embed_features.py --checkpoint "$W/classifier.pth" --data_path "$W/data" --split test --method tsne \
    --output_dir "$W/embedding"
cp "$W/mae/retina_mae.png" docs/example_reconstruction.png
cp "$W/explanations/retina_lesion_rollout.png" docs/example_rollout.png
cp "$W/explanations/retina_lesion_chefer_lesion.png" docs/example_chefer.png
cp "$W/embedding/embedding_tsne.png" docs/example_embedding.png
ls -l docs/example_*.png
