"""The process group a run needs, before anything is built, and work done on one rank for all.

Shared by the trainer and ``adadpo-import-hf``, which sets up the same way without training.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist


def _free_port() -> int:
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


def computed_on_rank_zero[T](compute: Callable[[], T],
                             errors: Tuple[type, ...] = (ValueError, OSError),
                             share_result: bool = True) -> Optional[T]:
    """``compute()`` run on global rank 0 alone, its result broadcast to every rank (or, with
    ``share_result`` false, kept on rank 0: None elsewhere). One of ``errors`` it raises is
    raised on every rank instead (so that none waits in a collective for a rank that gave up),
    marked ``on_every_rank`` (so that a command prints it once)."""
    outcome: List[object] = [None, None]
    result = None
    if dist.get_rank() == 0:
        try:
            result = compute()
            outcome[0] = result if share_result else None
        except errors as err:
            outcome[1] = err
    dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        error = outcome[1]
        error.on_every_rank = True
        raise error
    return result if dist.get_rank() == 0 else outcome[0]
