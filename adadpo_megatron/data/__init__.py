"""Preference data: reading, validating, tokenising and caching pairs (``preference_data``),
tokenizers (``tokenizers``), and the micro-batches megatron's schedules consume, with the
sampler and the held-out split (``micro_batches``). Imports neither megatron-core nor the
trainer."""
