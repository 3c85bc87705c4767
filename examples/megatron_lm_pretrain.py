"""AdaDPO in Megatron-LM's own training loop: a launch script as a Megatron-LM team writes one.

What changes from a pretrain_gpt.py-style script: its datasets provider, forward step and model
provider are this plugin's, and the flags gain ``--adadpo-config RUN.yaml`` (the data, loss and
reference sections; the same file adadpo-precompute-reference read). Everything else, the
model, parallelism, optimizer, schedule, checkpoints and TensorBoard / W&B logging, stays
Megatron-LM's flags. examples/launch/megatron_lm_llama31_8b.sh launches it on several nodes;
docs/MEGATRON_LM.md says what each flag does here. On CPU it runs as the suite runs it
(tests/integrations/test_megatron_lm.py).

    torchrun --nproc_per_node 8 examples/megatron_lm_pretrain.py <Megatron-LM flags> \\
        --calculate-per-token-loss --adadpo-config configs/megatron_lm_llama31_8b_adadpo.yaml
"""

from megatron.core.enums import ModelType
from megatron.training import pretrain

import adadpo_megatron.integrations.megatron_lm as adadpo

if __name__ == "__main__":
    adadpo.prepare()  # the wheel's dataset helpers, SGD resume; CPU: the gloo layer
    with adadpo.one_line_errors():  # a bad flag, key, data file or cache: one line, exit 2
        args = adadpo.parse_args()  # Megatron-LM's flags + --adadpo-config, checked
        pretrain(adadpo.config_container(args), adadpo.datasets_provider,
                 ModelType.encoder_or_decoder, adadpo.forward_step,
                 model_provider=adadpo.model_provider)
