"""Fine-tune BLOOM (sequence classification, instruction/chat sft, or causal LM) on Ray Train + DeepSpeed.

On a cluster:
    ray job submit --working-dir . -- python jobs/finetune.py --config classify-tiny-cpu --output /mnt/shared/runs/cls --set data.path=/mnt/shared/data/reviews.csv
Locally (starts a local Ray):
    python jobs/finetune.py --config classify-tiny-cpu --output outputs/cls --set data.path=reviews.csv
Instruction tuning (JSONL of prompt/response pairs or chat messages):
    python jobs/finetune.py --config sft --output outputs/sft --set data.path=chats.jsonl
"""

import sys

from bloomray.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
