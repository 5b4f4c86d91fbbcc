"""SLIP's `eval_zeroshot.py --resume CKPT [--output-dir --batch-size 256 -j]`: zero-shot classification of
every entry of ./dataset_catalog.json (or `--dataset NAME`) with ./labels.json and ./templates.json, through
main_zeroshot.py (which also takes a plain `--data_path FOLDER`)."""
from __future__ import annotations

import sys

import slip_args
from util.cli import help_requested, run_main


def get_args_parser():
    return slip_args.get_zeroshot_parser("eval_zeroshot.py", __doc__, slip_defaults=True)


if __name__ == "__main__":
    if help_requested():
        get_args_parser().print_help()
        sys.exit(0)
    import main_zeroshot
    run_main(main_zeroshot.main, get_args_parser())
