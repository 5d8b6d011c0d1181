"""Pretrain (or continue pretraining) BLOOM on Ray Train + DeepSpeed.

On a cluster:
    ray job submit --working-dir . -- python jobs/pretrain.py --config bloom-560m-zero2 --output /mnt/shared/runs/x
Locally (starts a local Ray):
    python jobs/pretrain.py --config tiny-cpu --output outputs/tiny --set train.max_steps=30
"""

import sys

from bloomray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
