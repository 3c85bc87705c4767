"""python -m adadpo_megatron --config FILE.yaml [section.key=value ...]: adadpo-train."""

from adadpo_megatron.cli import train_main

train_main()
