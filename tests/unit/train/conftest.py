"""Fixtures of the train unit tests that drive real DeepSpeed engines."""

from __future__ import annotations

import socket

import pytest


@pytest.fixture(scope="module")
def dist_group():
    """A one-rank gloo process group in this process, as Ray Train gives each worker."""
    import deepspeed.comm
    import deepspeed.utils.groups
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
            mp.setenv(k, v)
        dist.init_process_group("gloo", rank=0, world_size=1)
        yield
        dist.destroy_process_group()
        # So a later module may initialise DeepSpeed again, in a new group: its backend and
        # the clone of the world group it caches belong to this one.
        deepspeed.comm.comm.cdb = None
        deepspeed.utils.groups._WORLD_GROUP = None
