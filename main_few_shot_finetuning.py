"""USPEC's script name for few-shot finetuning: a thin alias of main_few_shot.py (same flags)."""
from main_few_shot import get_args_parser, main
from util.cli import run_main

if __name__ == "__main__":
    parser = get_args_parser()
    parser.prog = "main_few_shot_finetuning.py"
    run_main(main, parser)
