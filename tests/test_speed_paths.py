"""Numerics of the training fast paths that live outside the benchmark: uint8 batch transport with
normalisation on the device, reduced-scale JPEG decoding, the pre-decoded cache, torch.compile (with its
eager fallback), channels_last for convolutional models, and DDP gradient accumulation (one all-reduce
per update).

Each fast path is compared to the plain path it replaces, with the tolerance stated in the test.
"""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch
from PIL import Image

import models_convmae  # noqa: F401  (registers the factories)
import models_mae  # noqa: F401
from conftest import describe, run_inprocess, run_pretrain, tiny_pretrain_flags
from util.blur import BlurSpec
from util.data import DeviceNormalize, PretrainDataset, PretrainTransform, images_to_device, load_image, resolve_norm
from util.registry import create_model
from util.runtime import CompiledOrEager, has_conv_layers, prepare_model

MEAN, STD = resolve_norm("imagenet")


def _photo(path, width: int, height: int, seed: int = 0, fmt: str = "JPEG") -> str:
    """A textured photo-like image: smooth colour field plus fine detail, so resampling errors show."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (height // 32, width // 32, 3), dtype=np.uint8))
    base = np.asarray(coarse.resize((width, height), Image.BICUBIC)).astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    detail = 30 * np.sin(xx / 7.0) * np.cos(yy / 11.0)
    img = np.clip(base + detail[..., None], 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return str(path)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def test_uint8_transport_is_bit_identical_to_float_path(tmp_path):
    files = [_photo(tmp_path / f"{i}.png", 80 + 8 * i, 64, seed=i, fmt="PNG") for i in range(6)]
    as_float = PretrainDataset(files, PretrainTransform(32, MEAN, STD), seed=3, num_patches=16)
    as_uint8 = PretrainDataset(files, PretrainTransform(32, MEAN, STD, output="uint8"), seed=3, num_patches=16)
    norm = DeviceNormalize(MEAN, STD)
    for key in [(0, i) for i in range(6)] + [(5, 2)]:
        f, u = as_float[key], as_uint8[key]
        assert u["image"].dtype == torch.uint8 and f["image"].dtype == torch.float32
        assert torch.equal(norm(u["image"]), f["image"])  # same op order: bitwise equal
        assert torch.equal(u["noise"], f["noise"])
    batch = torch.stack([as_uint8[(0, i)]["image"] for i in range(4)])
    ref = torch.stack([as_float[(0, i)]["image"] for i in range(4)])
    assert torch.equal(images_to_device(batch, torch.device("cpu"), norm), ref)
    nhwc = images_to_device(batch, torch.device("cpu"), norm, channels_last=True)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and torch.equal(nhwc, ref)
    assert norm(ref) is ref  # float batches pass through untouched


def test_jpeg_draft_keeps_crops_and_quality(tmp_path):
    """Large JPEGs (one not a multiple of 8 px), small crops: the draft path decodes at exactly the
    reduction `max_reduction` allows (checked through the decoded size), draws the same crop/flip/mask,
    and matches the full decode closely: PSNR > 40 dB (measured 44-46; a box misplaced by the ceil of
    the decoded size, or a scale off by 2, drops it to 32-40)."""
    import util.data as data_mod
    files = [_photo(tmp_path / "big0.jpg", 1536, 1152, seed=0), _photo(tmp_path / "big1.jpg", 1539, 1151, seed=1)]
    transform = PretrainTransform(64, MEAN, STD, output="uint8")
    full = PretrainDataset(files, transform, seed=1, num_patches=16)
    fast = PretrainDataset(files, transform, seed=1, num_patches=16, jpeg_draft=True)
    seen = []
    original = data_mod.load_image

    def spy(path, draft=None):
        asked = {}

        def record(w, h):
            asked["r"], asked["size"] = draft(w, h), (w, h)
            return asked["r"]
        img = original(path, draft=record if draft else None)
        if draft:
            seen.append((asked["size"], asked["r"], img.size))
        return img
    data_mod.load_image = spy
    try:
        for key in [(e, i) for e in range(3) for i in range(2)]:
            a, b = full[key], fast[key]
            assert torch.equal(a["noise"], b["noise"])
            assert _psnr(a["image"], b["image"]) > 40, key
    finally:
        data_mod.load_image = original
    for (w, h), r, decoded in seen:
        assert decoded == (-(-w // r), -(-h // r)), (w, h, r, decoded)  # exactly the allowed reduction
    assert any(r > 1 for _, r, _ in seen), "the draft path never reduced the decode"


def test_cache_builder_draft_matches_full_decode(tmp_path):
    """The cache's reduced-scale JPEG decode + resize vs full decode + resize, on a size that is not a
    multiple of 8: PSNR > 45 dB (measured 50-52; stretching the whole ceil-sized decode gives ~32)."""
    from util.image_cache_builder import load_image_resized, scaled_size
    path = _photo(tmp_path / "odd.jpg", 1539, 1151, seed=2)
    fast = torch.from_numpy(np.asarray(load_image_resized(path, 256)).copy())
    img = load_image(path)
    ref = torch.from_numpy(np.asarray(img.resize(scaled_size(*img.size, 256), Image.BICUBIC, reducing_gap=None)).copy())
    assert fast.shape == ref.shape and _psnr(fast, ref) > 45


def test_max_reduction_never_upsamples():
    t = PretrainTransform(224, MEAN, STD)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        w, h = int(torch.randint(200, 4000, (1,), generator=g)), int(torch.randint(200, 4000, (1,), generator=g))
        box, _ = t.sample_params(w, h, g)
        r = t.max_reduction(box)
        assert r in (1, 2, 4, 8)
        assert r == 1 or min(box[2], box[3]) // r >= 224


def test_draft_is_off_for_blur_and_pairs(tmp_path):
    files = [_photo(tmp_path / "a.jpg", 512, 512)]
    t = PretrainTransform(32, MEAN, STD)
    assert not PretrainDataset(files, t, blur=BlurSpec(), jpeg_draft=True).jpeg_draft
    assert not PretrainDataset(files, t, blurred_files=files, deblur=True, jpeg_draft=True).jpeg_draft
    assert PretrainDataset(files, t, jpeg_draft=True).jpeg_draft


def test_load_image_draft_only_touches_jpeg(tmp_path):
    png = _photo(tmp_path / "a.png", 640, 480, fmt="PNG")
    jpg = _photo(tmp_path / "a.jpg", 640, 480)
    assert load_image(png, draft=lambda w, h: 8).size == (640, 480)
    assert load_image(jpg, draft=lambda w, h: 4).size == (160, 120)
    assert load_image(jpg, draft=lambda w, h: 1).size == (640, 480)


def _args(**kw) -> argparse.Namespace:
    base = dict(grad_ckpt=False, channels_last=False, fsdp=False, distributed=False, compile=False, compile_mode=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_channels_last_convmae_matches_nchw():
    """NHWC convolutions reorder float sums: equal within 1e-5 (relative) in fp32."""
    torch.manual_seed(0)
    ref = create_model("convmae_convvit_micro_patch16", img_size=64)
    fast = create_model("convmae_convvit_micro_patch16", img_size=64)
    fast.load_state_dict(ref.state_dict())
    args = _args(channels_last=True)
    fast, plain = prepare_model(fast, args, torch.device("cpu"))
    assert args.channels_last_applied and plain is fast
    x = torch.randn(2, 3, 64, 64)
    noise = torch.rand(2, ref.num_patches)
    loss_ref = ref(x, mask_ratio=0.75, noise=noise)[0]
    loss_fast = fast(images_to_device(x, torch.device("cpu"), channels_last=True), mask_ratio=0.75, noise=noise)[0]
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-5, atol=1e-6)
    loss_fast.backward()
    loss_ref.backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_channels_last_ignored_for_plain_vit(medfound_log):
    model = create_model("mae_vit_micro_patch8", img_size=32)
    assert not has_conv_layers(model) and has_conv_layers(create_model("convvit_micro_patch16", img_size=64))
    args = _args(channels_last=True)
    prepare_model(model, args, torch.device("cpu"))
    assert not args.channels_last_applied
    assert "no convolutional stages" in medfound_log.text


def test_compile_falls_back_to_eager_when_compilation_fails(monkeypatch, medfound_log):
    model = create_model("mae_vit_micro_patch8", img_size=32)

    attempts = []

    def broken_compile(module, mode=None):
        def run(*a, **kw):
            attempts.append(1)
            raise RuntimeError("InductorError: no working C++ compiler")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    wrapped = CompiledOrEager(model)
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, model.num_patches)
    torch.testing.assert_close(wrapped(x, mask_ratio=0.75, noise=noise)[0], model(x, mask_ratio=0.75, noise=noise)[0])
    assert wrapped.state == "eager" and "continuing eager" in medfound_log.text
    wrapped(x, mask_ratio=0.75, noise=noise)
    assert len(attempts) == 1  # compilation is not retried on every step


def _epoch_losses(output_dir) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (output_dir / "log.txt").read_text().splitlines()]


def test_compiled_pretraining_matches_eager(synthetic_fundus_tree, tmp_path):
    """`--compile` (inductor on CPU) against eager over 2 epochs x 4 steps: inductor fuses and reorders
    float ops, so epoch losses agree within 1e-4 relative, not bitwise."""
    flags = tiny_pretrain_flags(synthetic_fundus_tree, epochs=2, vis_images=0)
    eager = run_inprocess("main_pretrain.py", [*flags, "--output_dir", tmp_path / "eager"])
    assert eager.returncode == 0, describe(eager)
    compiled = run_pretrain([*flags, "--compile", "--output_dir", tmp_path / "compiled"], timeout=400)
    assert compiled.returncode == 0, describe(compiled)
    assert "continuing eager" not in compiled.stdout + compiled.stderr, "torch.compile fell back to eager"
    a, b = _epoch_losses(tmp_path / "eager"), _epoch_losses(tmp_path / "compiled")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * abs(x), (a, b)
    # The checkpoint of a compiled run keeps the reference key names (no `_orig_mod.` / `module.`).
    from util.checkpoint import load_file
    keys = load_file(str(tmp_path / "compiled" / "checkpoint-last.pth"))["model"].keys()
    assert not any(k.startswith(("_orig_mod", "module", "compiled")) for k in keys)
    assert set(keys) == set(load_file(str(tmp_path / "eager" / "checkpoint-last.pth"))["model"].keys())


def test_training_reads_a_predecoded_cache_like_a_folder(synthetic_fundus_tree, tmp_path):
    """Pretraining and finetuning given a cache folder read only the cache: the source images are
    deleted before training, so any read of an original would fail."""
    import shutil
    from util.image_cache import clear_lookup_cache
    from util.image_cache_builder import build_image_cache
    source = tmp_path / "source"
    shutil.copytree(synthetic_fundus_tree, source)
    cache = tmp_path / "cache"
    summary = build_image_cache(str(source), str(cache), max_side=64)
    assert summary["images"] == 24
    shutil.rmtree(source)
    clear_lookup_cache()
    pre = run_inprocess("main_pretrain.py", [*tiny_pretrain_flags(cache, epochs=1), "--output_dir", tmp_path / "pt"])
    assert pre.returncode == 0, describe(pre)
    assert "16 images" in pre.stdout + pre.stderr  # cache/train, as with the image folder
    ft = run_inprocess("main_finetune.py", [
        "--model", "vit_micro_patch8", "--input_size", "32", "--data_path", cache, "--finetune",
        tmp_path / "pt" / "checkpoint-last.pth", "--epochs", "1", "--batch_size", "4", "--num_workers", "0", "--device",
        "cpu", "--aa", "none", "--reprob", "0", "--output_dir", tmp_path / "ft"])
    assert ft.returncode == 0, describe(ft)
    assert (tmp_path / "ft" / "test_metrics.json").is_file()


_COMM_COUNT_WRAPPER = """
import atexit, json, os, runpy, sys
sys.path.insert(0, {repo!r})
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
calls = [0]
_init = DDP.__init__
def init_and_count(self, module, *args, **kwargs):
    _init(self, module, *args, **kwargs)
    def counting_allreduce(state, bucket):
        calls[0] += 1
        return default_hooks.allreduce_hook(state, bucket)
    self.register_comm_hook(None, counting_allreduce)
DDP.__init__ = init_and_count
@atexit.register
def dump():
    with open(os.path.join(os.environ["DUMP_DIR"], "calls%s.json" % os.environ["RANK"]), "w") as f:
        json.dump(calls[0], f)
sys.argv = [os.path.join({repo!r}, "main_pretrain.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ddp_accumulation_reduces_once_per_update(tiny_pretrain_run, tmp_path):
    """2 processes x batch 1 x `--accum_iter 2` == 1 process x batch 4 (the shared tiny run), with one
    gradient all-reduce per optimizer update: `no_sync` covers the forward of the first micro-batch (DDP
    decides at forward time), so the 12 updates of 3 epochs cost 12 reductions (one bucket: the micro
    model is 0.4 MB, under DDP's 1 MiB first bucket), not 24."""
    import sys
    from conftest import REPO, child_env, free_port, max_abs_diff, run_cmd, without_key_bias
    wrapper = tmp_path / "count.py"
    wrapper.write_text(_COMM_COUNT_WRAPPER.format(repo=str(REPO)))
    out = tmp_path / "accum"
    flags = tiny_pretrain_flags(tiny_pretrain_run.data_path, batch_size=1, accum_iter=2, vis_images=0)
    proc = run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                    f"--master_port={free_port()}", wrapper, *flags, "--output_dir", out], timeout=240,
                   env=child_env(DUMP_DIR=str(tmp_path)))
    assert proc.returncode == 0, describe(proc)
    assert "effective batch 4" in proc.stdout and "static_graph off" in proc.stdout, proc.stdout
    updates = 3 * (16 // 4)
    assert [json.loads((tmp_path / f"calls{r}.json").read_text()) for r in (0, 1)] == [updates, updates]
    from util.checkpoint import load_file
    got = load_file(str(out / "checkpoint-last.pth"))["model"]
    want = load_file(str(tiny_pretrain_run.checkpoint))["model"]
    assert max_abs_diff(without_key_bias(got), without_key_bias(want)) <= 1e-5
    for a, b in zip(_epoch_losses(out), _epoch_losses(tiny_pretrain_run.output_dir)):
        assert abs(a - b) <= 1e-6 * abs(b) + 1e-7


def test_fsdp_with_channels_last_is_a_one_line_error():
    from util.cli import UserError
    model = create_model("convmae_convvit_micro_patch16", img_size=64)
    args = _args(channels_last=True, fsdp=True, distributed=True)
    try:
        prepare_model(model, args, torch.device("cpu"))
    except UserError as e:
        assert "--channels_last cannot be combined with --fsdp" in str(e)
    else:
        raise AssertionError("expected a UserError")


def test_training_step_has_no_per_step_host_sync(monkeypatch):
    """The loop reads device values (`.item()`, `bool(tensor)`) only at logging intervals: with
    print_freq 1000, 12 steps of MAE pretraining with fused AdamW make the same number of host reads
    as 2 steps do (the ones at step 0 and at the epoch's end), i.e. none per step."""
    from util.loop import Optimization, train_epoch
    from util.optim import build_adamw, param_groups_weight_decay
    from engine_pretrain import pretrain_forward

    def count_reads(steps: int) -> int:
        torch.manual_seed(0)
        model = create_model("mae_vit_micro_patch8", img_size=32)
        opt = Optimization(build_adamw(param_groups_weight_decay(model, 0.05), lr=1e-3, betas=(0.9, 0.95)), "none",
                           clip_grad=1.0)
        assert opt.optimizer.defaults.get("fused")
        batches = [{"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
                    "noise": torch.rand(2, model.num_patches)} for _ in range(steps)]
        normalize = DeviceNormalize(MEAN, STD)
        reads = [0]
        item, to_bool = torch.Tensor.item, torch.Tensor.__bool__

        def counted_item(t):
            reads[0] += 1
            return item(t)

        def counted_bool(t):
            reads[0] += 1
            return to_bool(t)
        monkeypatch.setattr(torch.Tensor, "item", counted_item)
        monkeypatch.setattr(torch.Tensor, "__bool__", counted_bool)
        try:
            train_epoch(model, batches, opt, 0, torch.device("cpu"),
                        lambda m, b: pretrain_forward(m, b, torch.device("cpu"), 0.75, True, normalize),
                        lambda e: 1e-3, print_freq=1000, steps_per_epoch=steps)
        finally:
            monkeypatch.setattr(torch.Tensor, "item", item)
            monkeypatch.setattr(torch.Tensor, "__bool__", to_bool)
        return reads[0]
    assert count_reads(12) == count_reads(2)


def test_torchvision_decoder_matches_pillow_and_falls_back(tmp_path, monkeypatch):
    """`decoder="torchvision"` decodes JPEGs to the same pixels as Pillow and resizes with torch's
    antialiased bicubic (PIL's kernel): the same crops/flips/masks, pixels within 2 levels (rounding).
    Reduced-scale decodes stay with Pillow; a decode failure falls back to Pillow's exact path."""
    import util.data as data_mod
    files = [_photo(tmp_path / f"p{i}.jpg", 400 + 13 * i, 300, seed=i) for i in range(3)]
    files.append(_photo(tmp_path / "p.png", 320, 240, fmt="PNG"))
    make = lambda decoder, draft=False: PretrainDataset(  # noqa: E731
        files, PretrainTransform(64, MEAN, STD, output="uint8"), seed=2, num_patches=16, decoder=decoder,
        jpeg_draft=draft)
    pil, tv = make("pil"), make("torchvision")
    calls = []
    real = data_mod.torchvision_jpeg_decoder()
    assert real is not None  # torchvision 0.26-0.29 ship it

    def counting(path):
        calls.append(path)
        return real(path)
    monkeypatch.setattr(data_mod, "_TORCHVISION_DECODE", counting)
    for key in [(e, i) for e in range(2) for i in range(4)]:
        a, b = pil[key], tv[key]
        assert torch.equal(a["noise"], b["noise"])
        diff = (a["image"].int() - b["image"].int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.5, key
    assert len(calls) == 6 and not any(c.endswith(".png") for c in calls)  # JPEGs only

    calls.clear()  # with --jpeg_draft, crops large enough for a reduced decode go to Pillow's draft
    big = _photo(tmp_path / "big.jpg", 1600, 1200, seed=5)
    ds = PretrainDataset([big], PretrainTransform(64, MEAN, STD, output="uint8"), seed=0, decoder="torchvision",
                         jpeg_draft=True)
    for e in range(4):
        ds[(e, 0)]
    assert len(calls) < 4

    def broken(path):
        raise RuntimeError("unsupported JPEG feature")
    monkeypatch.setattr(data_mod, "_TORCHVISION_DECODE", broken)
    for key in [(0, 0), (1, 2)]:
        assert torch.equal(tv[key]["image"], pil[key]["image"])


def test_compiled_finetuning_matches_eager(tmp_path):
    """`main_finetune.py --compile`: training, validation (an eval-mode recompile) and the test evaluation
    of the best checkpoint agree with eager (epoch losses within 1e-4 relative, same test metrics), and
    the best checkpoint keeps the reference key names."""
    import sys
    from conftest import run_cmd
    from util.checkpoint import load_file
    from util.synthetic import write_dataset
    data = tmp_path / "data"
    write_dataset(data, kind="ultrasound", layout="imagefolder", num_classes=2, n_per_class=12, size=32, seed=1)
    base = [sys.executable, "main_finetune.py", "--model", "vit_micro_patch8", "--input_size", "32", "--data_path",
            data, "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "4", "--num_workers", "0", "--device",
            "cpu", "--aa", "none", "--reprob", "0", "--bootstrap", "0", "--seed", "0"]
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        argv = [*base[2:], "--output_dir", tmp_path / name]
        # eager in this process; the compiled run in its own, so no compiled graph outlives the test
        proc = run_cmd([*base[:2], *argv, *extra], timeout=400) if extra else run_inprocess("main_finetune.py", argv)
        assert proc.returncode == 0, describe(proc)
        assert "continuing eager" not in proc.stdout + proc.stderr
        runs[name] = tmp_path / name
    a, b = _epoch_losses(runs["eager"]), _epoch_losses(runs["compiled"])
    assert len(a) == len(b) == 2 and all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(a, b)), (a, b)
    ta, tb = (json.loads((runs[n] / "test_metrics.json").read_text()) for n in ("eager", "compiled"))
    for k in ("auroc", "accuracy", "loss"):
        assert abs(ta[k] - tb[k]) <= 1e-4 * max(1.0, abs(ta[k])), (k, ta[k], tb[k])
    keys = load_file(str(runs["compiled"] / "checkpoint-best.pth"))["model"].keys()
    assert keys == load_file(str(runs["eager"] / "checkpoint-best.pth"))["model"].keys()


def test_finetune_datasets_decode_large_jpegs_at_reduced_scale(tmp_path):
    """`main_finetune.py --jpeg_draft`: an evaluation sample of a large JPEG is decoded at reduced scale
    (shorter side still >= input_size / crop_pct, so the resize only shrinks) and matches the full
    decode (PSNR > 38 dB); training's bound keeps RandomResizedCrop's smallest crop at >= input_size;
    a blur (defined in full-size pixels) turns it off."""
    import util.datasets as ds_mod
    from util.datasets import LabelledImageDataset
    from util.finetune_transforms import build_transform, decode_min_side
    assert decode_min_side(False, 224) == 256 and decode_min_side(False, 384) == 384
    assert decode_min_side(True, 224) == 915  # sqrt(0.08 * 3/4) * 915 >= 224
    path = _photo(tmp_path / "big.jpg", 2100, 1700, seed=4)
    tf = build_transform(False, 64, MEAN, STD)
    full = LabelledImageDataset([(path, 0)], tf, ["a"])
    fast = LabelledImageDataset([(path, 0)], tf, ["a"], decode_min_side=decode_min_side(False, 64))
    sizes = []
    original = ds_mod.load_image

    def spy(p, draft=None):
        img = original(p, draft=draft)
        sizes.append(img.size)
        return img
    ds_mod.load_image = spy
    try:
        a, b = full[0][0], fast[0][0]
    finally:
        ds_mod.load_image = original
    assert sizes == [(2100, 1700), (525, 425)]  # 1/4 scale, the largest allowed (1700 // 4 = 425 >= 73)
    to_pixels = lambda t: (t * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)) * 255  # noqa: E731
    assert _psnr(to_pixels(a), to_pixels(b)) > 45  # measured 55.7 (1/8 scale would give 30)
    assert LabelledImageDataset([(path, 0)], tf, ["a"], blur=BlurSpec(), decode_min_side=73).load(0).size == (2100, 1700)
