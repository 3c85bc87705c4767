"""Command-line entry points.

    adadpo-train --config FILE.yaml [section.key=value ...]
    adadpo-precompute-reference --config FILE.yaml [section.key=value ...]
    adadpo-import-hf / adadpo-export-hf (training/huggingface/cli.py)

Launch with torchrun for several processes (one node or many); ``python -m adadpo_megatron``
is adadpo-train, ``python -m adadpo_megatron COMMAND`` each other command (precompute-reference,
import-hf, export-hf):

    torchrun --nproc_per_node 2 -m adadpo_megatron --config configs/tiny_cpu.yaml \
        parallel.tensor_model_parallel_size=2
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Optional, Sequence

from adadpo_megatron.training.errors import USER_ERRORS, error_line, fail, rank
from adadpo_megatron.training.notices import quiet
from adadpo_megatron.training.preemption import (
    PREEMPTED_EXIT_CODE,
    SIGNALS,
    Preempted,
    StopRequests,
)


def _parse(argv: Optional[Sequence[str]], prog: str, what: str):
    quiet()  # before megatron-core is imported: its known notices, said once (notices.py)
    argv = sys.argv[1:] if argv is None else list(argv)
    epilog = None
    if "-h" in argv or "--help" in argv:  # the keys' list reads the config classes: on ask
        from adadpo_megatron.training.config_help import key_help

        epilog = key_help()
    parser = argparse.ArgumentParser(prog=prog, description=what, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's YAML file")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective config (defaults filled in, overrides "
                             "applied) as YAML and exit; every run writes the same to "
                             "output_dir/config.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override a config value, e.g. train.max_steps=5")
    args = parser.parse_args(argv)
    import torch  # after parsing: --help answers before torch's few seconds of import

    from adadpo_megatron.training.run_config import load_run_config

    try:
        config = load_run_config(args.config, args.overrides)  # its errors name the file
    except (ValueError, FileNotFoundError) as err:
        error_line(prog, str(err))
    if args.print_config:
        from adadpo_megatron.training.config_help import effective_yaml

        print(effective_yaml(config), end="")
        sys.exit(0)
    try:
        # the layout is checked against the world before any process group or model exists
        config.check_world(int(os.environ.get("WORLD_SIZE", "1")),
                           gpu=torch.cuda.is_available())
    except ValueError as err:
        error_line(prog, f"{args.config}: {err}")
    return config


def train_main(argv: Optional[Sequence[str]] = None) -> None:
    prog = "adadpo-train"
    # a preemption while the config is read and the modules imported stops at once
    early = StopRequests(immediate=True)
    early.install()
    try:
        config = _parse(argv, prog, "Train a megatron-core model with AdaDPO.")
        from adadpo_megatron.training.trainer import NonFiniteError, Trainer
    except Preempted as err:
        _preempted_in_setup(prog, err)
    trainer = Trainer(config, stop=early)
    try:
        trainer.setup()
        trainer.train()
    except NonFiniteError as err:
        if rank() == 0:
            print(f"{prog}: stopped: {err}", file=sys.stderr, flush=True)
        sys.exit(3)
    except Preempted as err:
        _preempted_in_setup(prog, err)
    except USER_ERRORS as err:
        fail(prog, err)
    finally:
        trainer.close()
        # the run is over (its checkpoint saved): a signal during the exit changes nothing
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    if trainer.stopped:
        if trainer.is_logging_rank:
            print(f"{prog}: stopped early ({trainer.stopped}); a checkpoint is saved in "
                  f"{config.train.output_dir}/checkpoints and the same command resumes from it; "
                  f"exit code {PREEMPTED_EXIT_CODE}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)


def _preempted_in_setup(prog: str, err: Preempted) -> None:
    if rank() == 0:
        print(f"{prog}: stopped early ({err}): no step had run, so nothing was saved; the "
              f"same command starts again where the last checkpoint left off; exit code "
              f"{PREEMPTED_EXIT_CODE}", file=sys.stderr, flush=True)
    sys.exit(PREEMPTED_EXIT_CODE)


def precompute_main(argv: Optional[Sequence[str]] = None) -> None:
    prog = "adadpo-precompute-reference"
    config = _parse(argv, prog, "Write the reference's log-probs next to the data, for "
                                "reference.mode=precompute.")
    from adadpo_megatron.training.precompute import precompute_reference

    try:
        precompute_reference(config)
    except USER_ERRORS as err:
        fail(prog, err)


def import_hf_main(argv: Optional[Sequence[str]] = None) -> None:
    from adadpo_megatron.training.huggingface.cli import import_main

    import_main(argv)


def export_hf_main(argv: Optional[Sequence[str]] = None) -> None:
    from adadpo_megatron.training.huggingface.cli import export_main

    export_main(argv)


COMMANDS = {"train": train_main, "precompute-reference": precompute_main,
            "import-hf": import_hf_main, "export-hf": export_hf_main}


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
