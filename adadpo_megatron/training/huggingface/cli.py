"""``adadpo-import-hf`` and ``adadpo-export-hf``: their arguments, parsed before torch and
megatron-core are imported (several seconds), so ``--help`` and a usage error answer at once.
The work is ``hf_import.import_checkpoint`` and ``hf_export.export_checkpoint``."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from adadpo_megatron.training.errors import USER_ERRORS, fail

_OVERWRITE = ("replace an existing non-empty OUT that is not an earlier {what}, deleting its "
              "files")


def import_main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="adadpo-import-hf",
        description="A local Hugging Face Llama-family model as a megatron-core torch_dist "
                    "checkpoint (model.load); under torchrun each process holds its shard.")
    parser.add_argument("directory", help="config.json + safetensors, as save_pretrained wrote")
    parser.add_argument("out", help="the checkpoint directory to write")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to build with")
    parser.add_argument("--pp", type=int, default=None,
                        help="pipeline stages to build with (default: world size / tp)")
    parser.add_argument("--overwrite", action="store_true",
                        help=_OVERWRITE.format(what="import"))
    args = parser.parse_args(argv)
    import torch.distributed as dist

    from adadpo_megatron.training.huggingface.hf_import import import_checkpoint

    try:
        import_checkpoint(args.directory, args.out, tp=args.tp, pp=args.pp,
                          overwrite=args.overwrite)
    except USER_ERRORS as err:
        fail("adadpo-import-hf", err)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def export_main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="adadpo-export-hf",
        description="A checkpoint (or a run's latest) as a Hugging Face model directory.")
    parser.add_argument("checkpoint", help="a run's output_dir, its checkpoints/, a checkpoint, "
                                           "or a Megatron-LM checkpoint root")
    parser.add_argument("out", help="the Hugging Face directory to write")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="cast the weights (default: as stored)")
    parser.add_argument("--shard-gb", type=float, default=5.0, help="largest shard, GiB")
    parser.add_argument("--peft", action="store_true",
                        help="a LoRA run: write out as a PEFT adapter directory "
                             "(adapter_config.json, adapter_model.safetensors) for its base, "
                             "instead of the adapters merged into the base")
    parser.add_argument("--overwrite", action="store_true",
                        help=_OVERWRITE.format(what="export"))
    parser.add_argument("--config", metavar="RUN.yaml",
                        help="for a Megatron-LM checkpoint (which records no run): the run "
                             "config whose model section and data.tokenizer describe it")
    args = parser.parse_args(argv)
    from adadpo_megatron.training.huggingface.hf_export import export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype,
                                shard_bytes=int(args.shard_gb * 1024**3), peft=args.peft,
                                overwrite=args.overwrite, config=args.config)
    except USER_ERRORS as err:
        fail("adadpo-export-hf", err)
    print(f"wrote {out}", flush=True)
