"""Forward+backward time per image of a pretraining family against MAE-B, measured in the same run.

  --family convmae   ConvMAE-B/16 vs MAE-B/16, both with 512x8 decoders
  --family crossmae  CrossMAE-B reconstructing 25 / 50 / 75 % of the patches, with the released decoder
                     depth (12) and MAE's (8), vs MAE-B

224 px, mask 0.75, batch 4, fp32 by default, the same fixed mask noise for every configuration. The
configurations are timed round-robin so machine drift hits them alike; medians and minima per image are
reported with their ratio to MAE-B (the minimum is the more robust figure on a shared machine).

  python benchmarks/family_vs_mae.py --family convmae --threads 1
  python benchmarks/family_vs_mae.py --family crossmae --repeats 9
  python benchmarks/family_vs_mae.py --family crossmae --device cuda --batch_size 64 --amp bf16
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
import models_crossmae  # noqa: E402,F401  (registers crossmae_*)
import models_mae  # noqa: E402,F401
from util.registry import create_model  # noqa: E402

MAE_B = ("MAE-B/16 (decoder 512x8)", "mae_vit_base_patch16", {}, {})


def configs(family: str, mask_ratio: float) -> list[tuple[str, str, dict, dict]]:
    """(label, model name, constructor kwargs, forward kwargs); MAE-B first, the baseline of every ratio."""
    if family == "convmae":
        return [MAE_B, ("ConvMAE-B/16 (decoder 512x8)", "convmae_convvit_base_patch16", {}, {})]
    out = [MAE_B]
    for dd in (12, 8):
        for kept in (0.25, 0.5, 0.75):
            out.append((f"CrossMAE-B dd{dd} kept {kept:.2f}", "crossmae_vit_base_patch16", {"decoder_depth": dd},
                        {"kept_mask_ratio": min(kept, mask_ratio)}))
    return out


def step(model, imgs, noise, mask_ratio, fwd_kw, amp_dtype, device) -> None:
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = model(imgs, mask_ratio=mask_ratio, noise=noise, **fwd_kw)[0]
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True, choices=("convmae", "crossmae"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per configuration")
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
    for label, name, ctor, fwd in configs(args.family, args.mask_ratio):
        torch.manual_seed(0)
        model = create_model(name, img_size=args.input_size, **ctor).to(device).train()
        noise = torch.rand(args.batch_size, model.num_patches, generator=torch.Generator().manual_seed(1)).to(device)
        runs.append((label, model, noise, fwd, sum(q.numel() for q in model.parameters()), []))
    for _ in range(args.warmup):
        for _, model, noise, fwd, _, _ in runs:
            step(model, imgs, noise, args.mask_ratio, fwd, amp_dtype, device)
    for _ in range(args.repeats):
        for _, model, noise, fwd, _, times in runs:
            t0 = time.perf_counter()
            step(model, imgs, noise, args.mask_ratio, fwd, amp_dtype, device)
            times.append(time.perf_counter() - t0)
    desc = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# forward+backward per image: {desc}; torch {torch.__version__}; batch {args.batch_size}, "
          f"{args.input_size}px, mask {args.mask_ratio}, amp {args.amp}, {args.repeats} steps, {args.warmup} warm-up")
    per_image = [[t / args.batch_size * 1e3 for t in run[5]] for run in runs]
    base_med, base_min = statistics.median(per_image[0]), min(per_image[0])
    print(f"{'configuration':36s} {'params':>8s} {'ms/img med':>10s} {'min..max':>16s} {'time/MAE med':>12s} "
          f"{'time/MAE min':>12s}")
    for (label, _, _, _, n_params, _), per in zip(runs, per_image):
        med = statistics.median(per)
        print(f"{label:36s} {n_params / 1e6:7.1f}M {med:10.1f} {min(per):7.1f}..{max(per):7.1f} "
              f"{med / base_med:12.2f} {min(per) / base_min:12.2f}")


if __name__ == "__main__":
    main()
