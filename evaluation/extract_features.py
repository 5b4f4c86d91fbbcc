"""VisionFM's script path for feature extraction: runs main_vfm_features.py with the same flags, e.g.

  python -m torch.distributed.launch --nproc_per_node=2 evaluation/extract_features.py \\
      --pretrained_weights ./pretrain_weights/VFM_Fundus_weights.pth --batch_size_per_gpu 768 \\
      --data_path ./dataset/multi_cls_random/FundusClassificationMulti/ --modality Fundus \\
      --dst_root ./dataset/multi_cls_random/FunClsFeat/
"""
import argparse
import os
import sys

# Run as a file (python evaluation/extract_features.py), this folder is first on the path, not the repository.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vfm_args  # noqa: E402  (torch-free: --help stays instant)
from util.cli import exit_if_help, run_main  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    return vfm_args.features_parser("extract_features.py", __doc__)


exit_if_help(get_args_parser)
import main_vfm_features  # noqa: E402  (pulls in torch)

if __name__ == "__main__":
    run_main(main_vfm_features.main, get_args_parser())
