"""The process group and the megatron-core modules a run needs, before anything is built.

Shared by the trainer and ``adadpo-import-hf``, which sets up the same way without training.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(gpu: bool, timeout_minutes: float = 30.0) -> None:
    """Joins torchrun's process group (or makes a one-process one, on a free port unless
    MASTER_PORT is set, so that two runs on one host never collide). ``timeout_minutes``
    bounds every collective of the default group."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if gpu else "gloo",
                            timeout=timedelta(minutes=timeout_minutes))


def import_megatron_modules() -> None:
    """Imports what the loop uses, so that cpu_compat.enable() covers all of it."""
    import megatron.core.distributed  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401
    import megatron.core.transformer.moe.moe_layer  # noqa: F401

    from adadpo_megatron.training.checkpoint import _import_checkpointing

    _import_checkpointing()
