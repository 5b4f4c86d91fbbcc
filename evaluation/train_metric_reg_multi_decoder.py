"""VisionFM's biomarker regression decoder on extracted multi-modal features (train_metric_reg_multi_decoder.py): main_vfm_decoder.py with --task metric_reg, same flags."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from util.cli import exit_if_help, run_main  # noqa: E402


def get_args_parser():
    import vfm_decoder_args
    return vfm_decoder_args.get_args_parser("evaluation/train_metric_reg_multi_decoder.py", task="metric_reg")


exit_if_help(get_args_parser)
from main_vfm_decoder import main  # noqa: E402  (pulls in torch; --help has already exited above without it)

if __name__ == "__main__":
    run_main(main, get_args_parser())
