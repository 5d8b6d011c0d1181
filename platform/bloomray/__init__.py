"""bloomray: BLOOM pretraining, fine-tuning, pruning search and serving on Ray."""

import hashlib
import os
import sys

__version__ = "0.1.0"

# DeepSpeed's C++ ops (CPU Adam, the CPU shm all-reduce) are JIT-built into torch's extension
# cache, by default one dir per user (~/.cache/torch_extensions) whatever the environment. Two
# environments on one home (two checkouts, a CI clone, venvs on a shared NFS home) compile
# them with different include paths, so each rebuilds the other's ops on its next run: minutes
# of g++ inside the first training step. One cache per environment (sys.prefix) instead; a
# TORCH_EXTENSIONS_DIR set by the user wins. `make setup` builds both ops there once.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR",
    os.path.join(
        os.path.expanduser("~"),
        ".cache",
        "bloomray",
        "torch_extensions",
        hashlib.sha256(sys.prefix.encode()).hexdigest()[:12],
    ),
)
