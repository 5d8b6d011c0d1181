"""Search learning rate and sparsity schedules with Ray Tune (each trial a Ray Train + DeepSpeed run).

On a cluster:
    ray job submit --working-dir . -- python jobs/tune.py --config tune-bloom-560m --output /mnt/shared/tune/x
Locally (starts a local Ray):
    python jobs/tune.py --config tune-tiny-cpu --output outputs/tune
"""

import sys

from bloomray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
