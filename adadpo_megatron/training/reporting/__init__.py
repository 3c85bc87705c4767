"""What a person reads of a run: metrics.jsonl, TensorBoard and the progress bar
(``run_log``), adadpo-plot (``plots``) and adadpo-summary (``summary``)."""
