"""Run a function on N spawned CPU processes over gloo and report failures from every rank."""

from __future__ import annotations

import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(fn, rank, world_size, init_file, results, args):
    try:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=60))
        fn(rank, world_size, *args)
        results.put((rank, None))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 180.0) -> None:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks.

    ``fn`` must be importable (a module-level function). Raises AssertionError with the
    traceback of every failing rank, and names the ranks that did not finish in time.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, init_file, results, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        reports = {}
        deadline = time.monotonic() + timeout
        while len(reports) < world_size and time.monotonic() < deadline:
            try:
                rank, error = results.get(timeout=1.0)
                reports[rank] = error
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()) + 5)
            if p.is_alive():
                p.kill()
                p.join()
    failures = [f"rank {r}:\n{e}" for r, e in sorted(reports.items()) if e]
    missing = [r for r in range(world_size) if r not in reports]
    if missing:
        codes = {r: procs[r].exitcode for r in missing}
        failures.append(f"ranks {missing} did not report within {timeout:.0f}s "
                        f"(exit codes {codes})")
    if failures:
        raise AssertionError("distributed test failed\n" + "\n".join(failures))
