"""Checkpoints with megatron-core's distributed checkpointing (torch_dist format).

Layout of ``<train.output_dir>/checkpoints``:

    step_0000010/          one checkpoint: model chunks and optimizer as ShardedTensors,
                           keyed by global names, so it loads on any TP/PP/VPP layout;
                           adadpo_state.pt (next step, LR schedule, config, the loss's
                           running state) and rng_rank<r>.pt (each rank's RNG state)
    latest                 the name of the newest complete checkpoint

A checkpoint is written to ``step_N.tmp`` and renamed only when every rank has finished,
then ``latest`` is replaced atomically: a save killed halfway leaves the previous
checkpoint, and ``latest`` pointing at it, untouched. The data position is the step number
(the sampler is a pure function of seed and step), so resuming continues exactly.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from adadpo_megatron.mcore.lora import is_adapter_name
from adadpo_megatron.training.checkpointing.resume_checks import check_resume
from adadpo_megatron.training.run_config import to_dict

if TYPE_CHECKING:
    from adadpo_megatron.training.run_config import RunConfig

STATE_FILE = "adadpo_state.pt"
LATEST = "latest"


def megatron_dist_checkpointing():
    """megatron-core's dist_checkpointing (imported on use: this module needs no megatron)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing


def save_sharded(sharded: Dict, path: Path) -> None:
    """megatron-core's ``dist_checkpointing.save`` (torch_dist), synchronous, in this process.

    Its writer hands write results back through one queue per process, made on first use as
    a multiprocessing Manager queue for the async saves it can run in a worker process: a
    spawned server process per rank, about 2 s at the first save. This save runs in this
    process (its writer threads at most), so a thread-safe queue does the same for its
    duration; the Manager queue stays megatron-core's for anyone else's async save."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    own = getattr(filesystem_async, "_results_queue", False) is None
    if own:
        filesystem_async._results_queue = queue.Queue()
    try:
        megatron_dist_checkpointing().save(sharded, str(path))
    finally:
        if own:
            filesystem_async._results_queue = None


PARTS = ("all", "base", "adapters")


def model_sharded_state_dict(chunks: List[torch.nn.Module], part: str = "all") -> Dict:
    """{"model<i>": sharded state dict} of the unwrapped chunks (DDP or plain): every tensor,
    the base model's only (no LoRA adapters) or the adapters' only."""
    assert part in PARTS, part
    states = {}
    for i, chunk in enumerate(chunks):
        state = getattr(chunk, "module", chunk).sharded_state_dict()
        if part != "all":
            state = {k: v for k, v in state.items()
                     if is_adapter_name(k) == (part == "adapters")}
        states[f"model{i}"] = state
    return states


def load_model_state(chunks: List[torch.nn.Module], loaded: Dict, part: str = "all") -> None:
    """Copies a loaded ``model_sharded_state_dict(chunks, part)`` into the chunks; for one
    part, every tensor of that part and nothing else."""
    for i, chunk in enumerate(chunks):
        module = getattr(chunk, "module", chunk)
        result = module.load_state_dict(loaded[f"model{i}"], strict=part == "all")
        if part != "all":
            missing = [k for k in result.missing_keys if is_adapter_name(k) == (part == "adapters")
                       and not k.endswith("_extra_state")]
            if missing or result.unexpected_keys:
                raise ValueError(f"loading the model's {part}: missing {missing}, unexpected "
                                 f"{result.unexpected_keys}")


def model_part(config) -> str:
    """What a run's checkpoints hold: its adapters with LoRA (the base is model.hf's or
    model.load's, loaded again on resume), else the whole model."""
    return "adapters" if config.model.lora is not None else "all"


def checkpoint_root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str) -> Optional[Path]:
    """The checkpoint to resume from under output_dir, or None when there is none
    (``latest_in`` its checkpoints/)."""
    return latest_in(checkpoint_root(output_dir))


def latest_in(root: Path) -> Optional[Path]:
    """The checkpoint to resume from in the checkpoints folder ``root``, or None.

    The one ``checkpoints/latest`` names; without that pointer (deleted, empty, or a kill
    between a first checkpoint's rename and the pointer's write), the newest step directory
    once it is verified complete, so that a restart never starts again at step 0 over the run's
    checkpoints and metrics.

    Raises:
        FileNotFoundError: ``latest`` names an incomplete checkpoint.
        ValueError: no ``latest``, and the newest step directory is incomplete.
    """
    pointer = root / LATEST
    named = pointer_target(root)
    if named:
        path = root / named
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{pointer} names {path.name}, which is not a complete "
                                    "checkpoint; remove the pointer or restore the directory")
        return path
    steps = step_directories(root)
    if not steps:
        return None
    newest = steps[-1]
    problem = incomplete(newest)
    if problem:
        older = f", or remove it to resume from {steps[-2].name}" if len(steps) > 1 else ""
        raise ValueError(f"{root} has no '{LATEST}' pointer and its newest checkpoint "
                         f"{newest.name} is incomplete ({problem}): restore it{older}; a run "
                         "never writes over a checkpoint it cannot account for")
    return newest


def pointer_target(root: Path) -> str:
    """The checkpoint name ``root/latest`` holds, "" when it is missing or empty."""
    pointer = root / LATEST
    return pointer.read_text().strip() if pointer.is_file() else ""


def step_directories(root: Path) -> List[Path]:
    """The checkpoint directories (step_NNNNNNN, no temporary ones) under ``root``, oldest
    first."""
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=_step_of)


def incomplete(path: Path) -> Optional[str]:
    """Why ``path`` is not a complete checkpoint, or None: its state file (readable, of the
    step its name says), megatron-core's metadata and every rank's RNG state are there."""
    if not (path / STATE_FILE).is_file():
        return f"no {STATE_FILE}"
    if not (path / "metadata.json").is_file():
        return "no metadata.json"
    try:
        meta = read_state(path)
    except ValueError as err:
        return str(err)
    if meta.get("next_step") != _step_of(path):
        return f"its {STATE_FILE} is of step {meta.get('next_step')}"
    missing = [r for r in range(int(meta.get("world_size", 1)))
               if not (path / f"rng_rank{r}.pt").is_file()]
    if missing:
        return f"no RNG state of rank(s) {missing}"
    return None


MEGATRON_LATEST = "latest_checkpointed_iteration.txt"


def resolve_checkpoint(path) -> Path:
    """The checkpoint directory meant by ``path``: a checkpoint itself; a run's output_dir or
    its checkpoints/ (their ``latest``); or a Megatron-LM / Megatron-Bridge checkpoint root,
    whose latest_checkpointed_iteration.txt names an ``iter_NNNNNNN`` folder (or
    ``release``)."""
    path = Path(path)
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_file() or step_directories(root):
            found = latest_in(root)  # a lost or empty pointer: the newest verified step
            if found is not None:
                return found
    if (path / MEGATRON_LATEST).is_file():
        text = (path / MEGATRON_LATEST).read_text().strip()
        name = "release" if text == "release" else f"iter_{int(text):07d}"
        if not (path / name).is_dir():
            raise FileNotFoundError(f"{path / MEGATRON_LATEST} names {name}, which is not in "
                                    f"{path}")
        return path / name
    return path


@dataclass
class CheckpointState:
    """What a checkpoint saves and restores, handed over by its owner (the trainer), as
    torchtitan's checkpoint manager takes its states.

    Fields:
        config: the RunConfig: saved (resuming compares it), and its model.lora decides what
            part of the model is saved (``model_part``).
        model: this rank's model chunks [VPP], DDP-wrapped or plain.
        optimizer: megatron-core's optimizer over them.
        scheduler: megatron-core's OptimizerParamScheduler.
        data_content: the loaded data's content hash (resuming refuses other data).
        loss_state: the loss's running state (bco_pair's reward mean): an object with
            state_dict() / load_state_dict(), or None.
        gpu: whether the CUDA RNG states are saved too.
        files: the run's ``source_fingerprints`` (tokenizer and weight files): saved, so that
            resuming notices files changed in place.
    """

    config: RunConfig
    model: List[torch.nn.Module]
    optimizer: Any
    scheduler: Any
    data_content: str
    loss_state: Optional[Any] = None
    gpu: bool = False
    files: Optional[Dict[str, str]] = None


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a failed write) on some rank; its
    partial directory is removed and the previous checkpoint is untouched."""


def save_checkpoint(state: CheckpointState, next_step: int, keep: int = 2) -> Path:
    """Saves model, optimizer, LR schedule, data position (next_step), RNG, config and the
    loss's running state.

    Raises:
        CheckpointWriteError: on every rank, when any rank's write failed (naming the
            ranks, the directory and the cause, "no space left on device" for a full disk),
            after the partial step directory is removed; ``latest`` still names the
            previous checkpoint.
    """
    c = state.config
    root = checkpoint_root(c.train.output_dir)
    name = f"step_{next_step:07d}"
    final, tmp = root / name, root / (name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    try:
        model_state = model_sharded_state_dict(state.model, model_part(c))
        sharded = dict(model_state)
        sharded["optimizer"] = state.optimizer.sharded_state_dict(model_state)
        save_sharded(sharded, tmp)
        torch.save({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if state.gpu else None},
                   tmp / f"rng_rank{rank}.pt")
        if rank == 0:
            torch.save(_state_file(state, next_step), tmp / STATE_FILE)
        failure = None
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - any failed write;
        failure = _describe_failure(err, root)       # every rank learns of it below
    # one collective decides for all ranks, so that none renames, or waits, alone
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    if any(failures):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        error = _write_error(root, tmp, failures)
        error.on_every_rank = True  # every rank raises it: a command prints it once
        raise error
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_durably(root / LATEST, name + "\n")
        _prune(root, keep)
    dist.barrier()
    return final


def _write_durably(path: Path, text: str) -> None:
    """Replaces ``path`` with ``text`` atomically, and on disk before it is visible (a crash
    of the node must not leave an empty pointer)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _state_file(state: CheckpointState, next_step: int) -> Dict[str, Any]:
    """What adadpo_state.pt holds (rank 0 writes it)."""

    c = state.config
    # where the weights' architecture and tokenizer came from, resolved, for
    # adadpo-export-hf, which may run from another working directory
    sources = {"hf": str(c.resolve(c.model.hf).resolve()) if c.model.hf else None,
               "load": (str(resolve_checkpoint(c.resolve(c.model.load)).resolve())
                        if c.model.load else None),
               "tokenizer": (c.tokenizer_spec() if c.data.tokenizer == "byte"
                             else str(Path(c.tokenizer_spec()).resolve()))}
    # the loss's running state (bco_pair's reward mean) is the same on every rank
    loss_state = state.loss_state.state_dict() if state.loss_state is not None else {}
    return {"next_step": next_step, "scheduler": state.scheduler.state_dict(),
            "config": to_dict(c), "sources": sources, "loss_state": loss_state,
            "data_content": state.data_content, "files": state.files,
            "world_size": dist.get_world_size()}


_DISK_FULL = "no space left on device"


def _describe_failure(err: BaseException, root: Path) -> str:
    """One line for a failed write; "no space left on device: ..." for a full disk, which
    the checkpoint writer does not always say (torch's zip writer reports "unexpected pos"):
    the filesystem then has less room than the last checkpoint took."""
    if isinstance(err, CheckpointException):  # the writers' own errors, not their tracebacks
        err = next(iter(err.failures.values()))[0]
    text = " ".join(str(err).split()) or type(err).__name__
    full = "No space left on device" in text or getattr(err, "errno", None) == errno.ENOSPC
    if not full:
        previous = pointer_target(root)
        needed = (sum(p.stat().st_size for p in (root / previous).iterdir()) if previous
                  else 0)
        full = shutil.disk_usage(root).free < max(needed, 1024 * 1024)
    return f"{_DISK_FULL}: {text}" if full else text


def _write_error(root: Path, tmp: Path, failures: List[Optional[str]]) -> CheckpointWriteError:
    ranks = [r for r, f in enumerate(failures) if f]
    first = failures[ranks[0]]
    full = any(f.startswith(_DISK_FULL) for f in failures if f)
    cause = _DISK_FULL if full else "the write failed"
    previous = pointer_target(root)
    kept = (f"the previous checkpoint, {previous}, is intact" if previous
            else "no earlier checkpoint exists")
    return CheckpointWriteError(
        errno.ENOSPC if full else errno.EIO,
        f"checkpoint {tmp.name[:-len('.tmp')]} could not be written to {tmp} ({cause} on rank(s) "
        f"{ranks}: {first[len(_DISK_FULL) + 2 if full else 0:][:300]}); the partial step "
        f"directory was removed and {kept}"
        + ("; free space on that filesystem (or lower train.keep_checkpoints) and run the "
           "same command to resume" if full else ""))


def _step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1])


def _prune(root: Path, keep: int) -> None:
    """Keeps the checkpoint ``latest`` names and the ``keep - 1`` newest before it. Never
    deletes ``latest`` or anything newer (another run's, or a run resumed from an older
    checkpoint, never counts against this one's)."""
    named = pointer_target(root)
    if keep <= 0 or not named:
        return
    current = root / named
    older = [p for p in step_directories(root) if _step_of(p) < _step_of(current)]
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def check_resume_config(config, data_content: str, meta: Dict[str, Any], *, report: bool,
                        files: Optional[Dict[str, str]] = None,
                        data_parallel_size: Optional[int] = None) -> List[tuple]:
    """Refuses to resume the checkpoint whose state file is ``meta`` (``read_state``) with
    ``config`` (data of ``data_content``, input files of ``files``, the run's
    source_fingerprints, on ``data_parallel_size`` data-parallel ranks) if the config or the
    files changed in a way that alters the optimisation (resume_checks); prints the accepted
    changes when ``report``, and returns them as (YAML key, checkpoint's, this run's)."""
    saved = {**meta.get("config", {}), "data": {**meta.get("config", {}).get("data", {}),
                                                "content": meta.get("data_content")}}
    current = to_dict(config)
    current["data"] = {**current["data"], "content": (data_content
                                                      if meta.get("data_content") else None)}
    if data_parallel_size is not None and meta.get("world_size"):
        # how many ranks the pairs are grouped over: the checkpoint's world over its TP, PP, CP
        p = saved.get("parallel", {})
        model_parallel = (p.get("tensor_model_parallel_size", 1)
                          * p.get("pipeline_model_parallel_size", 1)
                          * p.get("context_parallel_size", 1))
        saved["parallel"] = {**p, "data_parallel_size": meta["world_size"] // model_parallel}
        current["parallel"] = {**current["parallel"], "data_parallel_size": data_parallel_size}
    changes = check_resume(saved, current, config.train.resume_allow_changes,
                           saved_files=meta.get("files"), current_files=files,
                           micro_batch_dependent=config.loss.token_mean_per_micro_batch)
    if changes and report:
        print("resuming with changed config: " + "; ".join(
            f"{k}: {a!r} -> {b!r}" for k, a, b in changes), flush=True)
    return changes


def read_state(path: Path) -> Dict[str, Any]:
    """A checkpoint's adadpo_state.pt (next step, schedule, config, ...).

    Raises:
        ValueError: it cannot be read (truncated, foreign), naming the file.
    """
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"{path / STATE_FILE} cannot be read ({type(err).__name__}: {err}); "
                         "the checkpoint is damaged: resume from another one") from err


def init_sgd_state(optimizer, config=None) -> None:
    """torch SGD's momentum buffers, as zeros (its first step sets a missing buffer to the
    gradient, which is the same as momentum times a zero buffer plus the gradient)."""
    for group in optimizer.param_groups:
        if group.get("momentum"):
            for param in group["params"]:
                optimizer.state[param].setdefault("momentum_buffer", torch.zeros_like(param))


# what megatron-core keys a parameter group by besides these settings, which the config sets
_GROUP_SETTINGS = ("max_lr", "min_lr", "start_wd", "end_wd")


def _same_structure(saved_group: Dict[str, Any], groups: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The group of ``groups`` holding the same kind of parameters as ``saved_group``: the
    same megatron-core identifier, settings aside."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    keys = [k for k in param_group_identifier_keys if k not in _GROUP_SETTINGS]
    for group in groups:
        if all(group.get(k) == saved_group.get(k) for k in keys):
            return group
    raise ValueError("the checkpoint's optimizer parameter groups ("
                     f"{[{k: g.get(k) for k in keys} for g in groups]}) do not match this "
                     "run's: it was written with another optimizer setup")


def _load_optimizer_state(optimizer, loaded: Dict[str, Any]) -> None:
    """The checkpoint's per-parameter state (Adam's moments and step, SGD's momentum) into
    ``optimizer``, every group setting (learning-rate bounds, weight decay, betas, eps) staying
    this run's config's, so that a change train.resume_allow_changes allows takes effect:
    megatron-core would otherwise look each group up by the checkpoint's settings (and fail on
    another lr), and restore the checkpoint's settings into the optimizer."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [loaded] if len(chained) == 1 else [v for _, v in sorted(loaded.items())]
    settings = []
    for inner, state in zip(chained, states, strict=True):
        for saved_group in state["param_groups"]:
            current = _same_structure(saved_group, inner.param_groups)
            saved_group.update({k: current[k] for k in _GROUP_SETTINGS if k in current})
        settings.append([{k: v for k, v in g.items() if k != "params"}
                         for g in inner.param_groups])
    optimizer.load_state_dict(loaded)
    for inner, groups in zip(chained, settings, strict=True):
        for group, setting in zip(inner.param_groups, groups, strict=True):
            group.update(setting)


def load_checkpoint(state: CheckpointState, path: Path,
                    meta: Optional[Dict[str, Any]] = None) -> int:
    """Restores a checkpoint into ``state`` (on any layout); returns the step to continue
    from. Weights, optimizer moments, step count, RNG and the loss's state come from the
    checkpoint; optimizer settings and the learning-rate schedule from ``state.config``
    (equal to the checkpoint's unless train.resume_allow_changes allowed a change). ``meta``:
    its state file when already read (``read_state``)."""
    dist_checkpointing = megatron_dist_checkpointing()
    for optimizer in getattr(state.optimizer, "chained_optimizers", [state.optimizer]):
        # megatron-core calls init_state_fn before loading, so that the state has tensors to
        # load into; it has none for SGD
        if getattr(optimizer, "init_state_fn", True) is None:
            optimizer.init_state_fn = init_sgd_state
    part = model_part(state.config)
    model_state = model_sharded_state_dict(state.model, part)
    sharded = dict(model_state)
    sharded["optimizer"] = state.optimizer.sharded_state_dict(model_state, is_loading=True)
    try:
        check_tensor_shapes(model_state, path)  # the model section against the checkpoint's
        loaded = dist_checkpointing.load(sharded, str(path))
    except ValueError:
        raise
    except (Exception, CheckpointException) as err:  # a truncated shard, a missing file
        error = ValueError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}); it is damaged "
                           "or incomplete: resume from another one (train.resume=<path>)")
        # torch's distributed checkpoint gathers every rank's failure to every rank
        error.on_every_rank = isinstance(err, CheckpointException)
        raise error from err
    load_model_state(state.model, loaded, part)
    _load_optimizer_state(state.optimizer, loaded["optimizer"])
    meta = meta if meta is not None else read_state(path)
    # the scheduler keeps this run's settings (it is built to override the checkpoint's) and
    # takes the step count: the rates are those a fresh run of this config has from there on
    state.scheduler.load_state_dict(meta["scheduler"])
    if state.loss_state is not None:
        state.loss_state.load_state_dict(meta.get("loss_state", {}))
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if meta["world_size"] == dist.get_world_size():
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["cpu"])
            if state.gpu and rng["cuda"] is not None:
                torch.cuda.set_rng_state_all(rng["cuda"])
        else:  # dropout then draws other numbers than the uninterrupted run would
            print(f"adadpo-train: warning: {rng_file} is missing: rank {dist.get_rank()} "
                  "continues with a fresh random state (not bitwise the uninterrupted run)",
                  file=sys.stderr, flush=True)
    return int(meta["next_step"])


def load_model_weights(chunks: List[torch.nn.Module], path: str) -> None:
    """Loads only model weights from a megatron-core distributed checkpoint (any layout).

    Works for this project's checkpoints and for Megatron-LM's torch_dist checkpoints of the
    same architecture (e.g. converted from Hugging Face with Megatron's conversion tools):
    tensors are matched by their global ShardedTensor keys. LoRA adapters, if the chunks have
    any, are not loaded: model.load is the base they adapt.
    """
    dist_checkpointing = megatron_dist_checkpointing()
    path = resolve_checkpoint(path)
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path} is not a megatron-core distributed checkpoint "
                                "(no metadata.json)")
    state = model_sharded_state_dict(chunks, "base")
    check_tensor_shapes(state, path)
    loaded = dist_checkpointing.load(state, str(path))
    load_model_state(chunks, loaded, "base")


def _sharded_tensors(state) -> Iterator:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for value in nested_values(state):
        if isinstance(value, ShardedTensorFactory):
            built = value.build_fn(value.key, value.data, value.replica_id,
                                   value.flattened_range)
            values = nested_values(built) if isinstance(built, dict) else built
            yield from (v for v in values if isinstance(v, ShardedTensor))
        elif isinstance(value, ShardedTensor):
            yield value


def check_tensor_shapes(state, path: Path) -> None:
    """Refuses a checkpoint whose tensors do not have the model's global shapes (vocabulary
    rows, hidden size, layer count, heads), naming the tensor and both shapes. megatron-core
    itself would load a smaller tensor into a larger one without a word. Every rank checks
    its own tensors, so every rank stops, before any weight is loaded."""
    dist_checkpointing = megatron_dist_checkpointing()
    saved = dist_checkpointing.load_tensors_metadata(str(path))
    for tensor in _sharded_tensors(state):
        if tensor.key not in saved:
            raise ValueError(f"{path}: has no tensor {tensor.key!r}, which the model needs "
                             f"(shape {tuple(tensor.global_shape)}); is it a checkpoint of "
                             "this architecture?")
        want, have = tuple(tensor.global_shape), tuple(saved[tensor.key].global_shape)
        if want != have:
            raise ValueError(f"{path}: tensor {tensor.key!r} has shape {have} in the "
                             f"checkpoint but {want} in the model; the model section (or the "
                             "tokenizer's vocabulary) does not match the checkpoint")
