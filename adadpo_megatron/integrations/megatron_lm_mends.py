"""Two mends to Megatron-LM's training loop as the megatron-core wheel (0.19.2) ships it, which
adadpo_megatron.integrations.megatron_lm.prepare applies: its start-up compiles dataset
helpers it cannot compile, and no SGD run of it can resume."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from adadpo_megatron.training.checkpointing.checkpoint import init_sgd_state


def use_shipped_dataset_helpers() -> bool:
    """Makes Megatron-LM's start-up use the dataset helpers the megatron-core wheel ships.

    ``initialize_megatron`` runs ``make`` in megatron/core/datasets on rank 0 and exits when
    it fails; the wheel ships the compiled ``helpers_cpp`` module but no Makefile, so
    pretrain() from the wheel stops there on any machine. Where the compiled module imports
    and the Makefile is absent, compiling is skipped; a source checkout compiles as before.

    Returns:
        whether the compile step is now skipped.
    """
    from megatron.core.datasets import utils as dataset_utils

    here = Path(dataset_utils.__file__).parent
    if (here / "Makefile").exists():
        return False
    if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is None:
        return False
    dataset_utils.compile_helpers = _helpers_already_built
    return True


def _helpers_already_built() -> None:
    """megatron-core's compile_helpers where the wheel shipped them built."""


def make_sgd_resumable() -> None:
    """Lets Megatron-LM's load_checkpoint resume an SGD run.

    megatron-core 0.19.2 builds its SGD with no ``init_state_fn``, which its optimizer calls
    before loading a checkpoint's state (for Adam it creates the moments), so Megatron-LM's
    loop cannot resume any SGD run. The optimizer Megatron-LM builds gets the function
    adadpo-train uses: SGD's momentum buffers as zeros (what torch's first step is
    equivalent to). Idempotent.
    """
    from megatron.training import training

    build = training.get_megatron_optimizer
    if getattr(build, "_adadpo_sgd_resumable", False):
        return

    def get_megatron_optimizer(*args, **kwargs):
        optimizer = build(*args, **kwargs)
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            if getattr(inner, "init_state_fn", True) is None:
                inner.init_state_fn = init_sgd_state
        return optimizer

    get_megatron_optimizer._adadpo_sgd_resumable = True
    training.get_megatron_optimizer = get_megatron_optimizer
