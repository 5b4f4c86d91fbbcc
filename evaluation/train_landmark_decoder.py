"""VisionFM's landmark detection decoder (train_landmark_decoder.py): main_vfm_dense.py with --task landmark, same flags."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from util.cli import exit_if_help, run_main  # noqa: E402


def get_args_parser():
    import vfm_dense_args
    return vfm_dense_args.get_args_parser("evaluation/train_landmark_decoder.py", task="landmark")


exit_if_help(get_args_parser)
from main_vfm_dense import main  # noqa: E402  (pulls in torch; --help has already exited above without it)

if __name__ == "__main__":
    run_main(main, get_args_parser())
