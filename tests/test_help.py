"""`--help` of every entry point: instant (no torch imported), every option explained, defaults shown,
"common options" first in the three main scripts."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from util.cli import HelpFormatter, exit_if_help, help_requested

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["main_pretrain.py", "main_finetune.py", "main_few_shot.py", "main_few_shot_finetuning.py",
           "visualize_mae.py", "explain.py", "embed_features.py", "main_benchmark.py", "blurred_images.py",
           "build_image_cache.py", "random_data.py"]
# Runs the script as __main__ with the given flag; the last line says whether torch got imported.
PROBE = """import runpy, sys
sys.argv = [{script!r}, {flag!r}]
code = None
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as e:
    code = e.code
print("PROBE", "torch" in sys.modules, code)
"""


# The other command lines (iBOT, VisionFM, SLIP/MedSLIP, segmentation, the reference projects' script paths):
# their --help must be instant too.
MORE_SCRIPTS = ["main_ibot.py", "main_slip.py", "main_zeroshot.py", "eval_zeroshot.py", "run_with_submitit.py",
                "main_vfm_features.py", "main_vfm_decoder.py", "main_vfm_dense.py", "main_segmentation.py",
                "evaluation/extract_features.py", "evaluation/random_data.py", "evaluation/train_cls_decoder.py",
                "evaluation/train_cls_multi_decoder.py", "evaluation/train_metric_reg_multi_decoder.py",
                "evaluation/train_forecasting_decoder.py", "evaluation/train_seg_decoder.py",
                "evaluation/train_landmark_decoder.py", "linear_probing_on_CBIS/linear_probe_CBIS_MedSLIP.py"]


@pytest.mark.parametrize("flag,script", [(f, s) for s in SCRIPTS for f in ("--help", "-h")]
                         + [("--help", s) for s in MORE_SCRIPTS])
def test_help_exits_0_without_torch(script: str, flag: str) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE.format(script=script, flag=flag)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("usage: "), out.stdout[:300]
    assert lines[-1] == "PROBE False 0", (lines[-1], out.stderr[-500:])


def parsers() -> dict[str, argparse.ArgumentParser]:
    import blurred_images
    import build_image_cache
    import embed_features
    import explain
    import main_benchmark
    import main_few_shot
    import main_few_shot_finetuning
    import main_finetune
    import main_pretrain
    import random_data
    import visualize_mae
    return {"main_pretrain.py": main_pretrain.get_args_parser(), "main_finetune.py": main_finetune.get_args_parser(),
            "main_few_shot.py": main_few_shot.get_args_parser(),
            "main_few_shot_finetuning.py": main_few_shot_finetuning.get_args_parser(),
            "visualize_mae.py": visualize_mae.get_args_parser(), "explain.py": explain.get_args_parser(),
            "embed_features.py": embed_features.get_args_parser(), "main_benchmark.py": main_benchmark.get_parser(),
            "blurred_images.py": blurred_images.build_parser(), "build_image_cache.py": build_image_cache.build_parser(),
            "random_data.py": random_data.build_parser()}


def test_every_option_has_help_and_the_shared_formatter() -> None:
    found = parsers()
    assert sorted(found) == sorted(SCRIPTS)
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in found.items() for a in p._actions
               if a.help != argparse.SUPPRESS and not (a.help or "").strip()]
    assert not missing, missing
    assert {name for name, p in found.items() if p.formatter_class is not HelpFormatter} == set()
    assert found["main_few_shot_finetuning.py"].prog == "main_few_shot_finetuning.py"
    # SUPPRESSed test hooks stay hidden
    assert "--inject_nonfinite" not in found["main_finetune.py"].format_help()


COMMON = {
    "main_finetune.py": {"model", "finetune", "data_path", "output_dir", "epochs", "batch_size", "recipe", "eval",
                         "resume", "predict"},
    "main_pretrain.py": {"model", "data_path", "output_dir", "epochs", "batch_size", "demo", "input_size",
                         "mask_ratio", "resume"},
}
COMMON["main_few_shot.py"] = COMMON["main_finetune.py"]


@pytest.mark.parametrize("script", sorted(COMMON))
def test_common_options_come_first(script: str) -> None:
    p = parsers()[script]
    titles = [g.title for g in p._action_groups]
    assert titles[2] == "common options", titles  # after argparse's "positional arguments" and "options"
    assert {a.dest for a in p._action_groups[2]._group_actions} == COMMON[script]
    text = p.format_help()
    assert text.index("common options:") < text.index("model:") < text.index("distributed / device:")


def test_torch_free_copies_match_their_sources() -> None:
    import explain
    import finetune_args
    import main_finetune
    import util.explain
    import util.loop
    import util.cli
    assert finetune_args.SMALL_DATA_IMAGES == main_finetune.SMALL_DATA_IMAGES
    assert explain.METHODS == util.explain.METHODS
    assert util.loop.AMP_CHOICES is util.cli.AMP_CHOICES
    recipe = next(a for a in main_finetune.get_args_parser()._actions if a.dest == "recipe")
    assert f"below {main_finetune.SMALL_DATA_IMAGES} training images" in recipe.help


def test_formatter_shows_defaults_where_they_add_something() -> None:
    p = argparse.ArgumentParser("x", formatter_class=HelpFormatter, description="line one\n  kept as written")
    p.add_argument("--name", default="out", help="a name")
    p.add_argument("--size", default=224, type=int, help="side")
    p.add_argument("--lr", default=None, type=float, help="lr (default: blr * batch / 256)")
    p.add_argument("--flag", action="store_true", help="a switch")
    p.add_argument("--on", action="store_true", default=True, help="on unless --off")
    p.add_argument("--pct", default=5, type=int, help="percent (%%)")
    text = " ".join(p.format_help().split())
    assert "line one\n  kept as written" in p.format_help()  # description layout untouched
    assert "a name (default: 'out')" in text and "side (default: 224)" in text
    assert "lr (default: blr * batch / 256)" in text and "(default: None)" not in text
    assert "a switch (default" not in text and "on unless --off (default: True)" in text
    assert "percent (%) (default: 5)" in text


def test_help_requested_and_exit_if_help(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    assert help_requested(["--model", "x", "-h"]) and help_requested(["--help"])
    assert not help_requested(["--", "--help"]) and not help_requested(["--hel"]) and not help_requested([])

    def get_parser() -> argparse.ArgumentParser:
        return argparse.ArgumentParser("prog.py")
    monkeypatch.setattr(sys, "argv", ["prog.py", "--help"])
    exit_if_help(get_parser)  # defined in a module that is not __main__ (imported): nothing happens
    get_parser.__module__ = "__main__"
    with pytest.raises(SystemExit) as e:
        exit_if_help(get_parser)
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: prog.py")
    monkeypatch.setattr(sys, "argv", ["prog.py", "--model", "x"])
    exit_if_help(get_parser)  # no help asked: returns, the script goes on
