"""The one place the training loop calls ``torch.distributed``.

With ``use_gpu`` Ray Train creates an NCCL process group, and NCCL has no CPU collectives:
an all-reduce of a CPU tensor fails at the first metric report. Every helper here moves its
tensor to the engine's device, reduces there, and hands back a CPU copy, so the same loop is
correct under gloo (CPU) and NCCL (GPU) by construction. A test asserts that no other module
of the package calls ``dist.*`` directly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum ``values`` over all ranks on ``device``; returns a CPU tensor (unchanged without a group)."""
    t = values.to(device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def barrier(device: torch.device) -> None:
    """Wait for every rank; NCCL's barrier is told which GPU this rank owns."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if device.type == "cuda" and dist.get_backend() == "nccl":
        dist.barrier(device_ids=[device.index if device.index is not None else torch.cuda.current_device()])
    else:
        dist.barrier()
