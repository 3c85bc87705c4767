"""The maths: the AdaDPO coefficient and the preference losses (``loss``), per-token log-probs
from vocab-parallel logits and the TP/CP reductions (``logprobs``), the fused path from
hidden states (``fused_logprobs``), and the batch statistics some losses reduce over
data-parallel ranks (``batch_statistics``). Imports torch and torch.distributed only: no
megatron-core, nothing else of this package but ``adadpo_megatron.validation``."""
