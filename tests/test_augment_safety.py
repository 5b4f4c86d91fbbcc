"""Finetuning augmentation never hands Pillow an invalid argument, and a sample that fails to load or
transform reaches the user as one line naming the file and the step (main process or DataLoader worker).

Pillow 13 rejects `ImageOps.posterize(img, 0)`, which timm's RandAugment asks for at its strongest
magnitude. Every test here replaces `PIL.ImageOps.posterize` by a strict recorder that raises exactly as
Pillow 13 does, so the tests mean the same on Pillow 10-12.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import PIL.ImageOps
import pytest
import torch
import timm.data.auto_augment as taa
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader
from torchvision import transforms as T

from util import synthetic
from util.augment import augment_ops, make_pillow_safe, safe_posterize
from util.cli import UserError, run_main, user_message
from util.data import PretrainDataset, PretrainTransform
from util.image_io import BadImageError
from util.skipping import SampleError, SkippedSample
from util.datasets import LabelledImageDataset, _seeded_global_rngs
from util.finetune_transforms import build_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 48
DEFAULT_AA = "rand-m9-mstd0.5-inc1"
# Every --aa family timm 1.0.x builds from ops with a posterize: RandAugment (increasing or not, Gaussian
# or uniform magnitudes, mmax above 10), the AutoAugment policies and AugMix.
AA_STRINGS = (DEFAULT_AA, "rand-m9-mstd0.5", "rand-m10-mstd101", "rand-m9-mstd0.5-inc1-mmax20", "rand-m20-mmax30",
              "v0", "v0r", "original", "originalr", "augmix-m5-w3", "augmix-m10-w4-d2")
_REAL_POSTERIZE = PIL.ImageOps.posterize
# timm's own transform with the arguments build_transform gives it (no clamp).
TIMM_KW = dict(input_size=SIZE, is_training=True, color_jitter=None, auto_augment=DEFAULT_AA, interpolation="bicubic",
               re_prob=0.25, re_mode="pixel", re_count=1, mean=MEAN, std=STD)


@pytest.fixture
def posterize_bits(monkeypatch) -> list[int]:
    """Bits of every posterize that reaches Pillow; raises on bits outside [1, 8] like Pillow 13."""
    calls: list[int] = []

    def strict(img: Image.Image, bits: int) -> Image.Image:
        calls.append(bits)
        if not 1 <= bits <= 8:
            raise ValueError("bits must be between or equal to 1 and 8")
        return _REAL_POSTERIZE(img, bits)
    monkeypatch.setattr(PIL.ImageOps, "posterize", strict)
    return calls


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """scikit-image's fundus photograph and synthetic fundus/ultrasound images, 64 px."""
    skdata = pytest.importorskip("skimage.data")
    out = [Image.fromarray(skdata.retina()).resize((64, 64), Image.LANCZOS)]
    out += [synthetic.sample(kind, seed, label=seed % 2, size=64).to_pil() for kind in ("fundus", "ultrasound")
            for seed in range(2)]
    return out


def draw(transform, img: Image.Image, seed: int) -> torch.Tensor:
    with _seeded_global_rngs(seed):
        return transform(img)


def test_default_transform_5000_draws_never_fail(images, posterize_bits, monkeypatch):
    requested: list[int] = []
    level = taa.LEVEL_TO_ARG["PosterizeIncreasing"]

    def record_level(magnitude, hparams):
        args = level(magnitude, hparams)
        requested.append(args[0])
        return args
    monkeypatch.setitem(taa.LEVEL_TO_ARG, "PosterizeIncreasing", record_level)
    transform = build_transform(True, SIZE, MEAN, STD)
    t0 = time.perf_counter()
    for i in range(5000):
        out = draw(transform, images[i % len(images)], i)
        assert out.shape == (3, SIZE, SIZE)
    elapsed = time.perf_counter() - t0
    print(f"5000 draws of the default training transform: {elapsed:.1f} s")
    assert 0 in requested, "timm never asked for 0 bits: the clamp was not exercised"
    assert posterize_bits and all(1 <= b <= 8 for b in posterize_bits)


def test_unpatched_timm_fails_like_pillow_13(images, posterize_bits):
    """The premise: timm's own default RandAugment raises on some of the same draws."""
    raw = create_transform(**TIMM_KW)
    with pytest.raises(ValueError, match="bits must be between"):
        for i in range(5000):
            draw(raw, images[i % len(images)], i)


def test_same_image_as_timm_whenever_timm_was_valid(images, monkeypatch):
    """Same seed, same image, for every draw where timm's posterize kept >= 1 bit; the draws that asked
    for 0 bits (an all-black image in Pillow < 13) get 1 bit instead."""
    bits: list[int] = []

    def old_pillow(img: Image.Image, b: int) -> Image.Image:  # Pillow < 13: 0 bits -> black image
        bits.append(b)
        return Image.new(img.mode, img.size) if b < 1 else _REAL_POSTERIZE(img, b)
    monkeypatch.setattr(PIL.ImageOps, "posterize", old_pillow)
    raw, safe = create_transform(**TIMM_KW), build_transform(True, SIZE, MEAN, STD)
    same = differ = posterized = 0
    for i in range(1500):
        img = images[i % len(images)]
        bits.clear()
        expected = draw(raw, img, i)
        zero = any(b < 1 for b in bits)
        got = draw(safe, img, i)
        if zero:
            differ += not torch.equal(got, expected)
        else:
            assert torch.equal(got, expected), f"draw {i} differs from timm"
            same += 1
            posterized += bool(bits)
    assert posterized > 50 and differ >= 1, (posterized, differ)


@pytest.mark.parametrize("aa", AA_STRINGS)
def test_every_op_argument_is_valid(aa, images, posterize_bits):
    """Every op of every --aa family, at magnitudes over its whole range, on RGB images."""
    transform = build_transform(True, 32, MEAN, STD, aa=aa)
    ops = list(augment_ops(transform))
    assert ops, f"no timm ops found in {aa}"
    assert all(op.aug_fn is safe_posterize for op in ops if op.name.startswith("Posterize"))
    img = images[0]
    for op in ops:
        top = op.magnitude_max or taa._LEVEL_DENOM
        for m in np.linspace(0.0, float(top), 11):
            for s in range(2):  # both signs of the randomly negated ops
                random.seed(s)
                args = op.level_fn(float(m), op.hparams) if op.level_fn is not None else ()
                op.aug_fn(img, *args, **dict(op.kwargs))
    assert all(1 <= b <= 8 for b in posterize_bits)


def test_v0_policy_posterize_needs_the_clamp(images, posterize_bits):
    """AutoAugment v0's ('Posterize', 0.8, 2) asks for 0 bits on every call: raw timm raises."""
    op = taa.AugmentOp("Posterize", prob=1.0, magnitude=2)
    with pytest.raises(ValueError):
        op(images[0])
    make_pillow_safe(T.Compose([taa.AutoAugment([[op]])]))
    assert op.aug_fn is safe_posterize
    op(images[0])
    assert posterize_bits[-1] == 1


def test_unknown_aa_is_one_line_error():
    with pytest.raises(UserError, match="--aa 'rand-q9'"):
        build_transform(True, 32, MEAN, STD, aa="rand-q9")


# ---------------------------------------------------------------------------------------------------
# One line for a failing sample
# ---------------------------------------------------------------------------------------------------

@pytest.fixture
def image_files(tmp_path) -> list[str]:
    paths = []
    for i in range(4):
        p = tmp_path / f"img{i}.png"
        synthetic.sample("fundus", i, label=i % 2, size=64).to_pil().save(p)
        paths.append(str(p))
    return paths


class Boom:
    def __call__(self, img):
        raise ValueError("boom\nsecond line")


def broken_randaugment() -> T.Compose:
    """The default training transform with every RandAugment op raising (a Pillow that rejects all)."""
    transform = build_transform(True, 32, MEAN, STD, reprob=0.0)

    def reject(img, *args, **kwargs):
        raise ValueError("rejected by Pillow")
    for op in augment_ops(transform):
        op.aug_fn = reject
        op.prob = 1.0
    return transform


def run_loader(dataset, num_workers: int, capfd) -> tuple[int, list[str]]:
    """Iterate the dataset through a DataLoader inside run_main; (exit status, stderr lines)."""
    def main(args: argparse.Namespace) -> None:
        batches = iter(DataLoader(dataset, batch_size=2, num_workers=num_workers))
        try:
            for _ in batches:
                pass
        except UserError as e:
            # Drop the frames that hold the loader iterator so its worker stops now: kept alive by the
            # traceback, it would be finalised by a later gc pass, which waits 5 s for the worker.
            raise e.with_traceback(None)
        finally:
            del batches
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argparse.ArgumentParser(prog="main_finetune.py"), [])
    return exit_info.value.code, capfd.readouterr().err.splitlines()


@pytest.mark.parametrize("num_workers", [0, 1])
def test_randaugment_failure_is_one_line(image_files, capfd, num_workers):
    samples = [(p, i % 2) for i, p in enumerate(image_files)]
    dataset = LabelledImageDataset(samples, broken_randaugment(), ["a", "b"], seed=0)
    status, err = run_loader(dataset, num_workers, capfd)
    assert status == 2
    assert len(err) == 1, err
    assert err[0].startswith("main_finetune.py: error: transform RandAugment (")
    assert f"failed on {image_files[0]}: ValueError: rejected by Pillow (" in err[0]
    assert err[0].endswith("--aa none turns RandAugment off)")


def test_injected_exception_in_worker_is_exactly_one_line(image_files, capfd):
    samples = [(p, 0) for p in image_files]
    dataset = LabelledImageDataset(samples, T.Compose([T.CenterCrop(32), Boom()]), ["a"])
    status, err = run_loader(dataset, 1, capfd)
    assert status == 2
    assert err == [f"main_finetune.py: error: transform Boom failed on {image_files[0]}: ValueError: boom second "
                   "line (please report it with this image)"]


def test_unreadable_image_from_worker_is_one_line_and_skip_still_works(image_files, capfd):
    Path(image_files[1]).write_bytes(b"not a png")
    samples = [(p, 0) for p in image_files]
    transform = build_transform(False, 32, MEAN, STD)
    status, err = run_loader(LabelledImageDataset(samples, transform, ["a"], bad_image="error"), 1, capfd)
    assert status == 2
    assert err == [f"main_finetune.py: error: {image_files[1]}: cannot read image (cannot identify image file); "
                   f"fix or remove the file, or pass --bad_image skip"]
    skipping = LabelledImageDataset(samples, transform, ["a"], bad_image="skip")
    served = [skipping[i] for i in range(4)]
    assert isinstance(served[1], SkippedSample) and served[1].path == image_files[1]  # dropped, not replaced
    assert [served[i][2] for i in (0, 2, 3)] == [0, 2, 3]


def test_pretraining_transform_failure_is_one_line(image_files, capfd):
    class BrokenCrop(PretrainTransform):
        def apply(self, *args, **kwargs):
            raise RuntimeError("resize failed")
    dataset = PretrainDataset(image_files, BrokenCrop(32, MEAN, STD))
    with pytest.raises(SampleError, match=f"^transform BrokenCrop failed on {image_files[0]}: RuntimeError: "):
        dataset[0]
    status, err = run_loader(dataset, 1, capfd)
    assert status == 2 and len(err) == 1 and err[0].startswith("main_finetune.py: error: transform BrokenCrop")
    Path(image_files[0]).write_bytes(b"broken")  # unreadable files keep their own message and policy
    with pytest.raises(BadImageError):
        PretrainDataset(image_files, PretrainTransform(32, MEAN, STD))[0]
    skipping = PretrainDataset(image_files, PretrainTransform(32, MEAN, STD), bad_image="skip")
    assert isinstance(skipping[0], SkippedSample) and skipping[1]["index"] == 1  # dropped, not replaced


def test_user_message_strips_torch_worker_preamble():
    from torch._utils import ExceptionWrapper
    try:
        try:
            raise KeyError("inner")
        except KeyError as e:
            raise SampleError("transform X failed on /a b/c.png: KeyError: 'inner' (hint)") from e
    except SampleError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 3")
    with pytest.raises(SampleError) as info:
        wrapper.reraise()
    assert str(info.value).startswith("Caught SampleError in DataLoader worker process 3.\nOriginal Traceback")
    assert user_message(info.value) == "transform X failed on /a b/c.png: KeyError: 'inner' (hint)"
    assert user_message(UserError("plain  message")) == "plain  message"
