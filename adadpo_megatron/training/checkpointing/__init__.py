"""Checkpoints and resuming: megatron-core distributed checkpoints of a run (``checkpoint``),
what resuming with another config refuses or accepts (``resume_checks``), what identifies
the input files (``fingerprints``), and the run directory's lock (``run_dir``)."""
