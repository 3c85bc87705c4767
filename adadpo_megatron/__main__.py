"""python -m adadpo_megatron [COMMAND] --config FILE.yaml [section.key=value ...]

COMMAND is ``train`` (the default, adadpo-train), ``precompute-reference``
(adadpo-precompute-reference), ``import-hf`` or ``export-hf`` (adadpo-import-hf,
adadpo-export-hf; their own arguments); train, precompute-reference and import-hf work under
torchrun:

    torchrun --nproc_per_node 8 -m adadpo_megatron --config configs/llama3_8b_paper.yaml
    torchrun --nproc_per_node 8 -m adadpo_megatron precompute-reference --config ...
"""

import sys

from adadpo_megatron.training.cli import main

main(sys.argv[1:])
