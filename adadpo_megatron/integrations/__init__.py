"""Plug-ins for training loops other than adadpo-train's: ``megatron_lm`` for Megatron-LM's
``pretrain()``."""
