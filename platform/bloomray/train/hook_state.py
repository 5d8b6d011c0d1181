"""Step hooks' state in a checkpoint, without pickle: tensors in safetensors, the rest in JSON.

Pruning masks and Taylor scores are tensors; storage may be shared, so nothing read back
may run code. Loaded onto each rank's own device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from bloomray.train.checkpoint import CorruptCheckpointError

HOOKS_TENSORS_FILE = "hooks.safetensors"
HOOKS_META_FILE = "hooks.json"
LEGACY_HOOKS_FILE = "hooks.pt"  # before safetensors: read (weights-only) so old runs resume
HOOKS_FORMAT = 1


def save_hook_states(directory: str | Path, states: list[dict[str, Any]]) -> None:
    """Write step hooks' states as ``hooks.safetensors`` (tensors) + ``hooks.json`` (the rest).

    A state value that is a dict of tensors (masks, Taylor scores) is stored under
    ``"{hook_index}/{key}/{name}"``; every other value must be JSON-serialisable.

    Args:
        directory: the checkpoint directory.
        states: one ``state_dict()`` per hook, in hook order.

    Raises:
        ValueError: a key or tensor name contains ``/`` (it would not read back).
        TypeError: a non-tensor value is not JSON-serialisable.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for i, state in enumerate(states):
        values, order = {}, {}
        for key, value in state.items():
            if isinstance(value, dict) and all(isinstance(t, torch.Tensor) for t in value.values()):
                bad = [n for n in [key, *value] if "/" in n]
                if bad:
                    raise ValueError(f"hook {i} state names must not contain '/': {bad}")
                order[key] = list(value)
                for name, t in value.items():
                    # A private contiguous CPU copy: safetensors refuses views sharing storage
                    # (global-scope masks are slices of one tensor).
                    tensors[f"{i}/{key}/{name}"] = t.detach().to("cpu", copy=True).contiguous()
            else:
                values[key] = value
        entries.append({"values": values, "tensor_dicts": order})
    directory = Path(directory)
    save_file(tensors, directory / HOOKS_TENSORS_FILE)
    # JSON last: its presence says the tensors beside it were written completely.
    text = json.dumps({"format": HOOKS_FORMAT, "hooks": entries}, indent=2)
    (directory / HOOKS_META_FILE).write_text(text)


def load_hook_states(directory: str | Path, device: torch.device | str) -> list[dict[str, Any]]:
    """The hook states :func:`save_hook_states` wrote, tensors on ``device`` (this rank's own).

    Args:
        directory: the checkpoint directory.
        device: where the tensors go (``cpu``, ``cuda:3``...), whatever device saved them.

    Returns:
        One state dict per hook (``[]`` when the checkpoint has no hook state), each tensor
        dict in the order it was saved.

    Raises:
        CorruptCheckpointError: hooks.json has no tensor file beside it, or lists a tensor the
            file lacks. Unreadable files raise what their reader raises.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / HOOKS_META_FILE
    if not meta_path.exists():
        legacy = directory / LEGACY_HOOKS_FILE
        return torch.load(legacy, map_location=device, weights_only=True) if legacy.exists() else []
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != HOOKS_FORMAT:
        raise CorruptCheckpointError(f"{meta_path}: unknown hook state format {meta.get('format')!r}")
    tensor_path = directory / HOOKS_TENSORS_FILE
    if not tensor_path.exists():
        raise CorruptCheckpointError(f"{meta_path} exists but {HOOKS_TENSORS_FILE} does not")
    tensors = load_file(tensor_path, device=str(device))
    states = []
    for i, entry in enumerate(meta["hooks"]):
        state = dict(entry["values"])
        for key, names in entry["tensor_dicts"].items():
            missing = [n for n in names if f"{i}/{key}/{n}" not in tensors]
            if missing:
                raise CorruptCheckpointError(f"{tensor_path} lacks hook {i} {key} {missing[:3]}")
            state[key] = {n: tensors[f"{i}/{key}/{n}"] for n in names}
        states.append(state)
    return states
