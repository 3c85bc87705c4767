"""The application around the maths and the hook-in: the YAML run config (``run_config``), the
loop (``trainer``), distributed checkpoints (``checkpoint``), the precomputed reference
(``reference_cache``, ``precompute``), the commands (``cli``) and what a person reads of a run
(``run_log``, ``plots``, ``summary``).

What scripts call is re-exported here, imported on first use (so that importing one module
of this package does not import them all):

    from adadpo_megatron.training import Trainer, load_run_config

    trainer = Trainer(load_run_config("configs/tiny_cpu.yaml", ["train.max_steps=2"]))
    trainer.setup().train()
    trainer.close()
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Trainer": "trainer",
    "RunConfig": "run_config",
    "load_run_config": "run_config",
    "latest_checkpoint": "checkpoint",
    "precompute_reference": "precompute",
    "import_checkpoint": "hf_checkpoints",
    "export_checkpoint": "hf_export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
