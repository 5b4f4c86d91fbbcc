"""Forward+backward time per image: ConvMAE-B vs MAE-B (issue 4).

`convmae_convvit_base_patch16` and `mae_vit_base_patch16` at 224 px, mask 0.75, batch 4, fp32 by default,
both with their reference 512x8 decoders and the same fixed mask noise. The two models are timed
round-robin in the same run (so machine drift hits both alike); the median per step is reported as
images/s, with the ConvMAE/MAE time ratio.

  python benchmarks/convmae_vs_mae_cpu.py                   # CPU, torch's default threads
  python benchmarks/convmae_vs_mae_cpu.py --threads 2 --repeats 7
  python benchmarks/convmae_vs_mae_cpu.py --device cuda --batch_size 64 --amp bf16
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models_convmae  # noqa: E402,F401  (registers convmae_*)
import models_mae  # noqa: E402,F401
from util.registry import create_model  # noqa: E402

MODELS = (("MAE-B/16 (ViT-B, dec 512x8)", "mae_vit_base_patch16"),
          ("ConvMAE-B/16 (ConvViT-B, dec 512x8)", "convmae_convvit_base_patch16"))


def step(model, imgs, noise, mask_ratio, amp_dtype, device) -> None:
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = model(imgs, mask_ratio=mask_ratio, noise=noise)[0]
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per model (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    torch.manual_seed(0)
    imgs = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    runs = []
    for label, name in MODELS:
        torch.manual_seed(0)
        model = create_model(name, img_size=args.input_size).to(device).train()
        noise = torch.rand(args.batch_size, model.num_patches, generator=torch.Generator().manual_seed(1)).to(device)
        n_params = sum(q.numel() for q in model.parameters())
        runs.append((label, model, noise, n_params, []))
    for _ in range(args.warmup):
        for _, model, noise, _, _ in runs:
            step(model, imgs, noise, args.mask_ratio, amp_dtype, device)
    for _ in range(args.repeats):
        for _, model, noise, _, times in runs:
            t0 = time.perf_counter()
            step(model, imgs, noise, args.mask_ratio, amp_dtype, device)
            times.append(time.perf_counter() - t0)
    desc = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# forward+backward per image: {desc}; torch {torch.__version__}; batch {args.batch_size}, "
          f"{args.input_size}px, mask {args.mask_ratio}, amp {args.amp}, median of {args.repeats} steps")
    medians = {}
    for label, _, _, n_params, times in runs:
        med = statistics.median(times)
        medians[label] = med
        print(f"{label:38s} {n_params / 1e6:7.1f}M params  {med * 1e3 / args.batch_size:8.1f} ms/image  "
              f"{args.batch_size / med:7.2f} images/s  (min {min(times) * 1e3 / args.batch_size:.1f} ms/image)")
    mae, conv = (medians[label] for label, _ in MODELS)
    print(f"ratio ConvMAE-B / MAE-B time per image: {conv / mae:.2f}x")


if __name__ == "__main__":
    main()
