"""Command-line entry points.

    adadpo-train --config FILE.yaml [section.key=value ...]
    adadpo-precompute-reference --config FILE.yaml [section.key=value ...]

Launch with torchrun for several processes (one node or many); ``python -m adadpo_megatron``
is adadpo-train, ``python -m adadpo_megatron precompute-reference`` the other command:

    torchrun --nproc_per_node 2 -m adadpo_megatron --config configs/tiny_cpu.yaml \
        parallel.tensor_model_parallel_size=2
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch


def _parse(argv: Optional[Sequence[str]], prog: str, what: str):
    parser = argparse.ArgumentParser(prog=prog, description=what)
    parser.add_argument("--config", required=True, help="the run's YAML file")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override a config value, e.g. train.max_steps=5")
    args = parser.parse_args(argv)
    from adadpo_megatron.training.run_config import load_run_config

    try:
        config = load_run_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"{prog}: error: {err}\n")
    try:
        # the layout is checked against the world before any process group or model exists
        config.check_world(int(os.environ.get("WORLD_SIZE", "1")),
                           gpu=torch.cuda.is_available())
    except ValueError as err:
        parser.exit(2, f"{prog}: error: {args.config}: {err}\n")
    return config


def train_main(argv: Optional[Sequence[str]] = None) -> None:
    config = _parse(argv, "adadpo-train", "Train a megatron-core model with AdaDPO.")
    from adadpo_megatron.training.preemption import PREEMPTED_EXIT_CODE
    from adadpo_megatron.training.trainer import NonFiniteError, Trainer

    trainer = Trainer(config).setup()
    try:
        trainer.train()
    except NonFiniteError as err:
        if trainer.is_logging_rank:
            print(f"adadpo-train: stopped: {err}", file=sys.stderr, flush=True)
        sys.exit(3)
    finally:
        trainer.close()
    if trainer.stopped:
        if trainer.is_logging_rank:
            print(f"adadpo-train: stopped early ({trainer.stopped}); a checkpoint is saved in "
                  f"{config.train.output_dir}/checkpoints and the same command resumes from it; "
                  f"exit code {PREEMPTED_EXIT_CODE}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)


def precompute_main(argv: Optional[Sequence[str]] = None) -> None:
    config = _parse(argv, "adadpo-precompute-reference",
                    "Write the reference's log-probs next to the data, for "
                    "reference.mode=precompute.")
    from adadpo_megatron.training.precompute import precompute_reference

    precompute_reference(config)


COMMANDS = {"train": train_main, "precompute-reference": precompute_main}


def main(argv: Sequence[str]) -> None:
    """``python -m adadpo_megatron [COMMAND] ...``: COMMAND defaults to train."""
    argv = list(argv)
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:])
    elif argv and not argv[0].startswith("-"):
        sys.exit(f"python -m adadpo_megatron: unknown command {argv[0]!r}; choose one of "
                 f"{', '.join(COMMANDS)} (train is the default)")
    else:
        train_main(argv)
