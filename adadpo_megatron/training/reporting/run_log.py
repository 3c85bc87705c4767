"""What a person watches: metrics.jsonl, a progress bar, TensorBoard, Weights & Biases.
Logging rank only."""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path
from typing import Dict, List

from tqdm import tqdm

from adadpo_megatron.training.config_help import effective_config, effective_yaml

WANDB_RUN_ID = "wandb_run_id"  # in output_dir: the W&B run a resumed start continues


def _kept_lines(path: Path, start_step: int) -> List[str]:
    """The lines of steps before ``start_step``; a last line that is not JSON (a write cut
    by a kill) is dropped, a bad line before it is an error naming the file and line."""
    lines = path.read_text(errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError) as err:
            if number == len(lines):
                break  # torn by a kill mid-write
            raise ValueError(f"{path}:{number} is not a metrics line ({err}); fix or remove "
                             "the file to resume") from err
        if step < start_step:
            kept.append(line)
    return kept


def _write_whole(path: Path, text: str) -> None:
    """Writes ``path`` atomically: a kill leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _set_aside(path: Path) -> Path:
    """Renames ``path`` to the first free ``path.N`` and says so: the metrics of a start that
    left no checkpoint (killed before its first save, or its checkpoints moved away) are
    kept, not written over, when the run starts again at step 0."""
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    kept = path.with_name(f"{path.name}.{n}")
    os.replace(path, kept)
    print(f"{path} held the metrics of an earlier start and there is no checkpoint to resume "
          f"from: they are kept as {kept.name}; this run starts at step 0", flush=True)
    return kept


def _start_wandb(config, out: Path, start_step: int):
    """The W&B run of train.wandb: a new one for a start at step 0, else the one
    output_dir/wandb_run_id names (a resumed start continues it); the effective config as its
    config; its files under output_dir/wandb."""
    try:
        import wandb  # optional: only runs that ask for it
    except ImportError:
        raise ValueError("train.wandb needs the wandb package: pip install wandb (or remove "
                         "train.wandb)") from None
    settings = config.train.wandb
    id_file = out / WANDB_RUN_ID
    if start_step and id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(4)  # W&B run ids: 8 of [a-z0-9]
        id_file.write_text(run_id + "\n")
    return wandb.init(project=settings["project"], entity=settings.get("entity"),
                      name=settings.get("name") or out.name, group=settings.get("group"),
                      tags=settings.get("tags"), mode=settings.get("mode", "online"),
                      dir=str(out), id=run_id, resume="allow",
                      config=effective_config(config))


class RunLog:
    """Writes the run's effective config to output_dir/config.yaml (as --print-config shows
    it) and each step's metrics to output_dir/metrics.jsonl (one JSON object a line), to
    Weights & Biases (train.wandb; the step as W&B's step, a resumed start continuing the
    same W&B run), to
    TensorBoard (output_dir/tensorboard) and to a progress bar with step, loss, reward
    accuracy, tokens/s, the real-token share of the computed tokens and ETA. On resume, the
    lines of steps from the resumed one on are dropped (atomically), so that every step
    appears once, and a last line torn by a kill is dropped too; then lines are appended. A
    start at step 0 over an earlier start's metrics keeps them as metrics.jsonl.N."""

    def __init__(self, config, start_step: int):
        t = config.train
        out = Path(t.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        if not start_step and path.is_file() and path.read_text().strip():
            _set_aside(path)  # a start from step 0 over metrics with no checkpoint to resume
        # this start's effective config, for people
        _write_whole(out / "config.yaml", effective_yaml(config))
        kept = _kept_lines(path, start_step) if start_step and path.is_file() else []
        _write_whole(path, "".join(line + "\n" for line in kept))
        self.metrics = open(path, "a")
        self.tensorboard = None
        if t.tensorboard:
            # TensorBoard's writer imports tensorboard and protobuf: seconds, only when asked
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out / "tensorboard"))
        self.wandb = _start_wandb(config, out, start_step) if t.logs_to_wandb else None
        self.bar = None
        if t.progress:
            self.bar = tqdm(total=t.max_steps, initial=start_step, desc="adadpo", unit="step",
                            file=sys.stdout, dynamic_ncols=True, mininterval=1.0)

    def write(self, metrics: Dict[str, float]) -> None:
        self.metrics.write(json.dumps(metrics) + "\n")
        self.metrics.flush()
        step = int(metrics["step"])
        if self.tensorboard is not None:
            for name, value in metrics.items():
                if name != "step":
                    self.tensorboard.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if k != "step"}, step=step)
        if self.bar is not None:
            postfix = {"loss": f"{metrics['loss']:.4f}"}
            if "rewards/accuracies" in metrics:
                postfix["acc"] = f"{metrics['rewards/accuracies']:.3f}"
            postfix["tok/s"] = f"{metrics.get('tokens_per_second', 0):.0f}"
            if "data/real_token_fraction" in metrics:
                postfix["real"] = f"{metrics['data/real_token_fraction']:.2f}"
            if "eval/rewards/accuracies" in metrics:
                postfix["eval_acc"] = f"{metrics['eval/rewards/accuracies']:.3f}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.bar is not None:
            self.bar.close()
