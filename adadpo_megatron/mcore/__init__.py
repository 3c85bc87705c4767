"""The hook into megatron-core: forward steps for its pipeline schedules (``forward_step``),
GPTModel chunks and their config sections (``model``, ``model_config``), and the layer that
runs megatron-core on CPU for development and CI (``cpu_compat``). Builds on ``ops``."""
