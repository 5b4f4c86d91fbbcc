"""USPEC's script name for few-shot finetuning: a thin alias of main_few_shot.py (same flags)."""
import argparse

import finetune_args
from util.cli import exit_if_help, run_main


def get_args_parser() -> argparse.ArgumentParser:
    return finetune_args.few_shot_parser("main_few_shot_finetuning.py", __doc__)


exit_if_help(get_args_parser)
from main_few_shot import main  # noqa: E402  (pulls in torch; --help has already exited above without it)

if __name__ == "__main__":
    run_main(main, get_args_parser())
