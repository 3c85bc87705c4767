"""Hugging Face models in and out: model.hf's import and adadpo-import-hf (``hf_import``),
adadpo-export-hf (``hf_export``, ``lora_export`` for LoRA runs), the torch_dist region reader
the export reads with (``dcp_reader``), and output directories written without destroying a
user's files (``output_dirs``); the two commands' arguments (``cli``)."""
