"""The maths: the AdaDPO coefficient and the preference losses (``loss``), per-token log-probs
from vocab-parallel logits and the TP/CP reductions (``logprobs``), and the fused path from
hidden states (``fused_logprobs``). Imports torch and torch.distributed only: no megatron-core,
nothing else of this package but ``adadpo_megatron.validation``."""
