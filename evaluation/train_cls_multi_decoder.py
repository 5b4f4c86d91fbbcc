"""VisionFM's multi-label classification decoder on extracted multi-modal features (train_cls_multi_decoder.py): main_vfm_decoder.py with --task multi_cls, same flags."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from util.cli import exit_if_help, run_main  # noqa: E402


def get_args_parser():
    import vfm_decoder_args
    return vfm_decoder_args.get_args_parser("evaluation/train_cls_multi_decoder.py", task="multi_cls")


exit_if_help(get_args_parser)
from main_vfm_decoder import main  # noqa: E402  (pulls in torch; --help has already exited above without it)

if __name__ == "__main__":
    run_main(main, get_args_parser())
