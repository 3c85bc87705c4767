"""Output directories that adadpo-import-hf and adadpo-export-hf write without destroying a
user's files.

An OUT is refused when it is, holds or lies inside a path the command reads from (the
source model, the run, its checkpoint: replacing OUT would delete it), whatever the flags;
and when it is a non-empty directory that the command did not write (it has no ``marker``
file) unless ``--overwrite``. The new directory is built in a temporary sibling
(``OUT.adadpo-tmp``, same parent, so that renaming it is atomic on one filesystem); then the
old OUT is moved aside (``OUT.adadpo-old``), the new one renamed into place and the old one
deleted. A failure before the rename leaves the old OUT as it was; a killed process leaves
at most ``OUT.adadpo-tmp`` (or, killed between the two renames, the old OUT as
``OUT.adadpo-old``), which the next write into OUT removes (or renames back). One write into
an OUT at a time: a second command into the same OUT is refused while the first holds
``OUT.adadpo-lock`` (``writing``; the file goes when the write ends), naming its pid and
host. An empty OUT, and one that is or
holds the working directory, are refused too (one inside it, ./hf_out, is the usual case).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Optional, Tuple

from adadpo_megatron.training.checkpointing.run_dir import ProcessLock

TMP_SUFFIX = ".adadpo-tmp"
OLD_SUFFIX = ".adadpo-old"
LOCK_SUFFIX = ".adadpo-lock"


def siblings(out: Path) -> Tuple[Path, Path]:
    """(the temporary sibling a new OUT is built in, where the old OUT is moved aside)."""
    return out.with_name(out.name + TMP_SUFFIX), out.with_name(out.name + OLD_SUFFIX)


def check_output(out, protected: Mapping[str, Optional[os.PathLike]], marker: str,
                 overwrite: bool) -> Path:
    """The resolved OUT (symlinks followed, relative to the working directory), after
    checking that writing it is safe (``check_protected``, then ``marker`` or ``overwrite``);
    what a killed write into it left is cleared (``recover``).

    Args:
        out: the output directory as the user gave it.
        protected: {what it is, e.g. "the run's model.hf": path or None}: paths OUT may not
            be, hold or lie inside, ``overwrite`` or not.
        marker: the file that marks a directory as this command's output (replaced freely).
        overwrite: replace a non-empty directory without ``marker`` (deleting its files).

    Raises:
        ValueError: naming OUT and the protected path and what it is, or naming --overwrite.
    """
    return _check_ownership(out, check_protected(out, protected), marker, overwrite)


def _check_ownership(given, out: Path, marker: str, overwrite: bool) -> Path:
    """``out`` (resolved) once it is new, empty, this command's or ``overwrite`` allows it;
    what a killed write left there cleared first."""
    recover(out)
    if not os.path.lexists(out) or out.is_dir() and (not any(out.iterdir())
                                                     or (out / marker).is_file()):
        return out  # new, empty, or ours
    if not overwrite:
        kind = "a directory that" if out.is_dir() else "a file, and"
        raise ValueError(f"the output directory {given} exists and is {kind} this command "
                         f"did not write (no {marker}); pass --overwrite to replace it and "
                         "delete everything in it, or choose a new or empty directory")
    return out


def check_protected(out, protected: Mapping[str, Optional[os.PathLike]]) -> Path:
    """The resolved OUT once it is known not to be, hold or lie inside a protected path, nor
    to be or hold the working directory (ValueError otherwise); looks at nothing else, changes
    nothing."""
    _require_named(out)
    given, out = out, Path(out).resolve()
    cwd = Path.cwd().resolve()
    clashes = []  # (0 is / 1 holds / 2 lies inside, what, path): "is" is the clearest
    for what, path in protected.items():
        if path is not None:
            path = Path(path).resolve()
            for order, clash in enumerate((out == path, out in path.parents,
                                           path in out.parents)):
                if clash:
                    clashes.append((order, what, path))
    # the working directory is neither read nor written: only replacing it (or what holds
    # it) would delete it; ./hf_out, inside it, is the usual OUT
    for order, clash in enumerate((out == cwd, out in cwd.parents)):
        if clash:
            clashes.append((order, "the working directory", cwd))
    if clashes:
        order, what, path = min(clashes, key=lambda c: c[0])
        relation = ("is", "holds", "lies inside")[order]
        raise ValueError(f"the output directory {given} {relation} {what} ({path}); "
                         "writing it would delete that, so it is refused even with "
                         "--overwrite: choose another directory")
    return out


@contextmanager
def claimed(out, protected: Mapping[str, Optional[os.PathLike]], marker: str,
            overwrite: bool) -> Iterator[Path]:
    """OUT checked (``check_output``) and held for this command alone while the block writes
    it (``writing``); a refused OUT leaves nothing behind, not even the lock's file."""
    resolved = check_protected(out, protected)
    with writing(resolved):
        yield _check_ownership(out, resolved, marker, overwrite)


def recover(out: Path) -> None:
    """Undoes what a killed write into ``out`` left: a temporary sibling is removed; an old
    OUT moved aside is deleted if the new one is in place, else renamed back."""
    tmp, old = siblings(out)
    if os.path.lexists(old):
        if os.path.lexists(out):
            _remove(old)
        else:
            os.rename(old, out)
    if os.path.lexists(tmp):
        _remove(tmp)


def fresh_sibling(out: Path) -> Path:
    """An empty temporary sibling of ``out`` to build the new directory in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    tmp, _ = siblings(out)
    tmp.mkdir()
    return tmp


def replace_directory(tmp: Path, out: Path) -> None:
    """Puts the finished ``tmp`` in place of ``out`` (which may not exist): two renames,
    then the old OUT is deleted. If the second rename fails, the old OUT is put back."""
    _, old = siblings(out)
    moved = os.path.lexists(out)
    if moved:
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if moved:
            os.rename(old, out)
        raise
    if moved:
        _remove(old)


@contextmanager
def writing(out: Path) -> Iterator[None]:
    """Holds ``OUT.adadpo-lock`` (beside OUT) while OUT is checked and written; the file goes
    with the lock.

    Raises:
        ValueError: another process is writing OUT, naming it.
    """
    _require_named(out)
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = ProcessLock(out.with_name(out.name + LOCK_SUFFIX), remove_on_release=True)
    holder = lock.acquire()
    if holder is not None:
        raise ValueError(f"the output directory {out} is being written by another command "
                         f"({holder}); wait for it to end or choose another directory")
    try:
        yield
    finally:
        lock.release()


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """One process: yields an empty temporary sibling of ``out`` to fill; when the block
    ends it replaces ``out``; when it raises, it is removed and ``out`` stays as it was."""
    tmp = fresh_sibling(out)
    try:
        yield tmp
        replace_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _require_named(out) -> None:
    """An empty OUT would be the working directory: refused, flags or not."""
    if not str(out).strip():
        raise ValueError("the output directory is empty: name one")


def _remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)
