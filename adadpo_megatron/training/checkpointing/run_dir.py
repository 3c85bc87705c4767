"""The run directory (train.output_dir): one run at a time, and no silent reuse.

A run holds an exclusive lock on ``output_dir/.adadpo.lock`` (a POSIX record lock, which the
kernel releases when the process dies, so a killed run never leaves a stale lock; it works on
NFS with lockd). The lock file names its holder's pid and host, so a second run into the
directory fails at start saying who has it. A fresh run (train.resume=never) into a directory
with checkpoints is refused unless train.overwrite=true, which removes them and metrics.jsonl
first. Global rank 0 does the file work; every rank gets the same verdict.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
from pathlib import Path
from typing import Optional

LOCK_FILE = ".adadpo.lock"


class RunDirectoryError(RuntimeError):
    """The output directory is locked by another run, unwritable, or holds a run that this
    one would overwrite."""


class ProcessLock:
    """An exclusive POSIX record lock on the file ``path``, held until ``release`` (or until
    the process dies: the kernel drops it, so no stale lock is left). The file names its
    holder (pid, host); with ``remove_on_release`` it is deleted by its holder on release
    (an acquirer that locked a file already deleted tries again on the new one)."""

    def __init__(self, path, remove_on_release: bool = False) -> None:
        self.path = Path(path)
        self.remove_on_release = remove_on_release
        self._fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """Takes the lock: None, or the holder ("pid N on host H") when another process has
        it. Raises OSError when the file cannot be created."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
                os.close(fd)
                return holder
            try:  # the file we locked is still the one at the path: not removed meanwhile
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            if self.remove_on_release:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)  # before the lock goes: the next one makes its own
            os.close(self._fd)  # closing drops the record lock
            self._fd = None


class RunDirectoryLock:
    """The exclusive lock of one output directory, held until ``release`` (or process exit)."""

    def __init__(self, output_dir) -> None:
        self.output_dir = Path(output_dir)
        self._lock = ProcessLock(self.output_dir / LOCK_FILE)

    def acquire(self) -> None:
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            holder = self._lock.acquire()
        except OSError as err:
            raise RunDirectoryError(f"train.output_dir={str(self.output_dir)!r} cannot be "
                                    f"written ({err.strerror}); choose a writable directory"
                                    ) from err
        if holder is not None:
            raise RunDirectoryError(
                f"train.output_dir={str(self.output_dir)!r} is in use by another run "
                f"({holder}); wait for it to end or choose another output_dir")

    def release(self) -> None:
        self._lock.release()


def prepare_fresh_run(output_dir, overwrite: bool) -> None:
    """For train.resume=never: refuses a directory holding checkpoints or metrics unless
    ``overwrite``, which removes them first."""
    output_dir = Path(output_dir)
    checkpoints = output_dir / "checkpoints"
    held = sorted(p.name for p in checkpoints.glob("step_*")) if checkpoints.is_dir() else []
    metrics = output_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.read_text().strip():
        held.append("metrics.jsonl")
    if not held:
        return
    if not overwrite:
        raise RunDirectoryError(
            f"train.resume=never, but train.output_dir={str(output_dir)!r} holds checkpoints "
            f"or metrics of another run ({', '.join(held[-3:])}"
            f"{', ...' if len(held) > 3 else ''}); set train.overwrite=true to delete them, "
            "train.resume=auto to continue that run, or choose another output_dir")
    shutil.rmtree(checkpoints, ignore_errors=True)
    for name in ("metrics.jsonl", "tensorboard", "wandb", "wandb_run_id", "config.yaml"):
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
