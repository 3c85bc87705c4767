"""AdaDPO for megatron-core: preference losses over tensor-, pipeline- and context-parallel models.

The public pieces:
    adadpo_megatron.config.LossConfig          the loss and its AdaDPO coefficient
    adadpo_megatron.loss.preference_loss       per-pair losses and metrics from sequence sums
    adadpo_megatron.loss.adadpo_coefficient    w = sg(min(k * r, C))
    adadpo_megatron.logprobs.vocab_parallel_logprobs   per-token log-probs, vocab-sharded logits
    adadpo_megatron.logprobs.sequence_logprobs         per-sequence sums over context parallel

Submodules are imported on use, so that the loss maths needs neither torch.distributed set-up
nor megatron-core at import time.
"""

__version__ = "0.1.0"
