"""Numeric and combination flags are checked right after parsing, before any work.

Every bad value below exits 2 with exactly one stderr line `prog: error: --flag ...` and leaves no output
folder; defaults and the seed command lines still pass the same checks. In-process (`run_main`) and fast:
nothing here trains, the few-shot case reads six tiny images.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from PIL import Image

import main_finetune
import main_few_shot
import main_pretrain
from util.cli import UserError, check_patch_multiple, check_range, parse_args, run_main

PRETRAIN_BAD = [
    (["--mask_ratio", "1.5"], "--mask_ratio"), (["--mask_ratio", "0"], "--mask_ratio"),
    (["--mask_ratio", "1"], "--mask_ratio"), (["--accum_iter", "0"], "--accum_iter"), (["--epochs", "0"], "--epochs"),
    (["--batch_size", "0"], "--batch_size"), (["--blr", "nan"], "--blr"), (["--blr=-1e-4"], "--blr"),
    (["--lr", "inf"], "--lr"), (["--lr", "0"], "--lr"), (["--weight_decay", "-0.1"], "--weight_decay"),
    (["--weight_decay", "nan"], "--weight_decay"), (["--input_size", "0"], "--input_size"),
    (["--model", "mae_vit_micro_patch8", "--input_size", "36"], "--input_size"),
    (["--warmup_epochs", "-1"], "--warmup_epochs"), (["--num_workers", "-1"], "--num_workers"),
    (["--kept_mask_ratio", "0"], "--kept_mask_ratio"),
]
FINETUNE_BAD = [
    (["--epochs", "0"], "--epochs"), (["--accum_iter", "0"], "--accum_iter"), (["--batch_size", "0"], "--batch_size"),
    (["--blr", "nan"], "--blr"), (["--lr", "-1"], "--lr"), (["--weight_decay", "inf"], "--weight_decay"),
    (["--input_size", "0"], "--input_size"), (["--model", "vit_micro_patch8", "--input_size", "36"], "--input_size"),
    (["--warmup_epochs", "-0.5"], "--warmup_epochs"), (["--num_workers", "-2"], "--num_workers"),
    (["--knn", "--knn_k", "0"], "--knn_k"), (["--knn", "--knn_k", "10", "0"], "--knn_k"),
    (["--smoothing", "1"], "--smoothing"), (["--smoothing", "-0.1"], "--smoothing"),
    (["--val_fraction", "1"], "--val_fraction"), (["--train_percent", "0"], "--train_percent"),
    (["--train_percent", "1.5"], "--train_percent"), (["--layer_decay", "0"], "--layer_decay"),
    (["--layer_decay", "1.2"], "--layer_decay"), (["--drop_path", "1"], "--drop_path"),
    (["--crop_scale", "0.9", "0.5"], "--crop_scale"), (["--crop_scale", "0", "1"], "--crop_scale"),
    (["--crop_scale", "0.5", "1.5"], "--crop_scale"),
]
FEW_SHOT_BAD = [
    (["--few_shot", "0"], "--few_shot"), (["--few_shot", "-3"], "--few_shot"), (["--few_shot", "2.5"], "--few_shot"),
    (["--few_shot", "5", "--seeds", ","], "--seeds"), (["--few_shot", "5", "--seeds", "1,x"], "--seeds"),
    (["--few_shot", "5", "--epochs", "0"], "--epochs"),
]


def assert_rejected(module, argv: list[str], flag: str, out: Path, capsys: pytest.CaptureFixture) -> str:
    """Exit 2, one stderr line `<prog>: error: <flag> ...`, no traceback, no output folder."""
    parser = module.get_args_parser()
    with pytest.raises(SystemExit) as e:
        run_main(module.main, parser, [*argv, "--output_dir", str(out), "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{parser.prog}: error: {flag} "), lines[0]
    assert not out.exists(), f"{out} was created before the flag check"
    return lines[0]


@pytest.mark.parametrize("argv,flag", PRETRAIN_BAD, ids=[" ".join(a) for a, _ in PRETRAIN_BAD])
def test_pretrain_rejects(argv, flag, tmp_path, capsys):
    assert_rejected(main_pretrain, argv, flag, tmp_path / "out", capsys)


@pytest.mark.parametrize("argv,flag", FINETUNE_BAD, ids=[" ".join(a) for a, _ in FINETUNE_BAD])
def test_finetune_rejects(argv, flag, tmp_path, capsys):
    assert_rejected(main_finetune, argv, flag, tmp_path / "out", capsys)


@pytest.mark.parametrize("argv,flag", FEW_SHOT_BAD, ids=[" ".join(a) for a, _ in FEW_SHOT_BAD])
def test_few_shot_rejects(argv, flag, tmp_path, capsys):
    assert_rejected(main_few_shot, argv, flag, tmp_path / "out", capsys)


def test_messages_say_what_is_wrong(tmp_path, capsys):
    line = assert_rejected(main_pretrain, ["--mask_ratio", "1.5"], "--mask_ratio", tmp_path / "a", capsys)
    assert "> 0 and < 1" in line and "1.5" in line
    line = assert_rejected(main_pretrain, ["--mask_ratio", "0"], "--mask_ratio", tmp_path / "b", capsys)
    assert "--blr" not in line  # it used to surface as a bad learning rate
    line = assert_rejected(main_pretrain, ["--blr", "nan"], "--blr", tmp_path / "c", capsys)
    assert "finite" in line
    line = assert_rejected(main_finetune, ["--knn_k", "10", "0"], "--knn_k", tmp_path / "d", capsys)
    assert "10 0" in line and "each value must be >= 1" in line
    line = assert_rejected(main_finetune, ["--crop_scale", "0.9", "0.5"], "--crop_scale", tmp_path / "e", capsys)
    assert "MIN" in line
    line = assert_rejected(main_pretrain, ["--model", "mae_vit_micro_patch8", "--input_size", "36"], "--input_size",
                           tmp_path / "f", capsys)
    assert "patch size 8" in line and "32 or 40" in line


def write_flat_tree(root: Path, counts: dict[str, int]) -> None:
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (32, 32), (40 * i % 255, 80, 120)).save(root / name / f"{i}.png")


def test_few_shot_above_the_smallest_class_names_it(tmp_path, capsys):
    data = tmp_path / "data"
    write_flat_tree(data, {"big": 9, "small": 5})
    line = assert_rejected(main_few_shot, ["--few_shot", "6", "--data_path", str(data), "--model", "vit_micro_patch8",
                                           "--input_size", "32", "--seeds", "1,2"], "--few_shot", tmp_path / "out", capsys)
    assert "'small' has only 5 images" in line and "--few_shot 5" in line


def test_check_shots_accepts_exactly_k_and_fractions():
    train = [(f"a{i}", 0) for i in range(5)] + [(f"b{i}", 1) for i in range(5)]
    ns = argparse.Namespace(few_shot=5.0)
    main_few_shot.check_shots(ns, train, ["a", "b"], "DATA")  # every class has k images: fine
    main_few_shot.check_shots(argparse.Namespace(few_shot=0.5), train[:6], ["a", "b"], "DATA")  # a fraction
    with pytest.raises(UserError, match="'b' has only 1 images"):
        main_few_shot.check_shots(ns, train[:6], ["a", "b"], "DATA")


# ------------------------------------------------------------------------- valid lines still pass
USPEC_PRETRAIN = ["--batch_size", "256", "--model", "mae_vit_large_patch16_cross_attention", "--output_dir", "X",
                  "--log_dir", "LOG_DIR", "--mask_ratio", "0.75", "--norm_pix_loss", "--epochs", "800",
                  "--warmup_epochs", "40", "--blr", "1.5e-4", "--weight_decay", "0.05", "--data_path", "DIR"]
USPEC_FINETUNE = ["--batch_size", "16", "--model", "RETFound_mae", "--savemodel", "--epochs", "100", "--blr", "5e-3",
                  "--layer_decay", "0.65", "--weight_decay", "0.05", "--drop_path", "0.2", "--nb_classes", "5",
                  "--data_path", "DATA", "--input_size", "224", "--finetune", "USPEC.pt", "--output_dir", "OUT",
                  "--task", "USPEC", "--global_pool"]


@pytest.mark.parametrize("argv", [[], USPEC_PRETRAIN, ["--demo"], ["--demo", "--input_size", "40"],
                                  ["--model", "mae_vit_micro_patch9", "--input_size", "32"],  # unknown: registry's error
                                  ["--mask_ratio", "0.9", "--kept_mask_ratio", "0.25", "--warmup_epochs", "0",
                                   "--weight_decay", "0", "--num_workers", "0", "--lr", "1e-3"]])
def test_pretrain_valid_lines_pass(argv):
    main_pretrain.check_args(parse_args(main_pretrain.get_args_parser(), argv))


@pytest.mark.parametrize("argv", [[], USPEC_FINETUNE, ["--knn", "--knn_k", "1", "20"], ["--crop_scale", "1", "1"],
                                  ["--model", "vit_micro_patch9", "--input_size", "32"],
                                  ["--smoothing", "0", "--val_fraction", "0", "--train_percent", "1",
                                   "--layer_decay", "1", "--drop_path", "0", "--warmup_epochs", "0"]])
def test_finetune_valid_lines_pass(argv):
    main_finetune.finetune_args.check_args(parse_args(main_finetune.get_args_parser(), argv))


@pytest.mark.parametrize("argv,seeds", [(["--few_shot", "10", "--seeds", "1,2,3"], [1, 2, 3]),
                                        (["--few_shot", "0.1", "--seed", "4"], [4]), (["--few_shot", "5.0"], [0])])
def test_few_shot_valid_lines_pass(argv, seeds):
    assert main_few_shot.check_args(parse_args(main_few_shot.get_args_parser(), argv)) == seeds


def test_range_helpers():
    check_range("--x", None, ">0")  # unset optional flag
    check_range("--x", [0.08, 1.0], ">0 <=1 ascending")
    with pytest.raises(UserError, match=r"^--x 2: must be >= 0 and < 1 \(a hint\)$"):
        check_range("--x", 2, ">=0 <1", "a hint")
    with pytest.raises(UserError, match="finite"):
        check_range("--x", float("-inf"), ">=0")
    with pytest.raises(ValueError):
        check_range("--x", 1, "positive")  # a typo in a rule is the programmer's error
    check_patch_multiple(224, "RETFound_mae")  # the name does not state a patch size: not checked
    check_patch_multiple(224, "vit_huge_patch14")
    with pytest.raises(UserError, match="patch size 14"):
        check_patch_multiple(230, "vit_huge_patch14")
