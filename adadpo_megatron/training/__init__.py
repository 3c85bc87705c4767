"""The application around the maths and the hook-in, in parts:

    run_config, layout      the YAML run config; the parallel layout and its process groups
    run, trainer            a set-up run (RunContext); the trainer that holds one
    reference_cache,        the precomputed reference log-probs and the command that writes
      precompute              them
    preemption, process_groups, cli
                            stopping on a signal or a budget; the process group; the commands
    checkpointing/          distributed checkpoints, what resuming checks, input fingerprints,
                            the run directory's lock
    huggingface/            Hugging Face models in (model.hf, adadpo-import-hf) and out
                            (adadpo-export-hf, LoRA's merged or PEFT export)
    reporting/              metrics.jsonl, TensorBoard, the progress bar, plots, the summary

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
    "latest_checkpoint": "checkpointing.checkpoint",
    "precompute_reference": "precompute",
    "import_checkpoint": "huggingface.hf_import",
    "export_checkpoint": "huggingface.hf_export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
