"""The application around the maths and the hook-in: the YAML run config (``run_config``), the
loop (``trainer``), distributed checkpoints (``checkpoint``), the precomputed reference
(``reference_cache``, ``precompute``), the commands (``cli``) and what a person reads of a run
(``run_log``, ``plots``, ``summary``)."""
