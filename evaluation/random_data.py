"""VisionFM's script path for synthetic data: `python evaluation/random_data.py --task T --dst_dir D
[--num 500 --img_size 512]` (also run from inside evaluation/). Runs the project's random_data.py."""
import os
import sys

# The project root holds random_data.py and util/; put it first so this works from any folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from random_data import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
