"""The start-up's notices: what megatron-core and torch warn about on every run, said once.

On a machine without Transformer Engine or Apex (every CPU run, and a GPU without them)
megatron-core warns at import and at every model build that it falls back to torch norms,
optimizers and tensor kernels, and that GPTModel, its async save and its CUDA-graph scope
names are deprecated; torch warns that it finds no CUDA runtime. None of it changes what
this project computes: the fallbacks are the paths it runs by design there, and the
deprecated names are megatron-core's own internals. ``quiet()`` silences exactly those
notices, by message (a new warning still shows), and ``environment_line()`` says in one line
what is missing and what that means.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from typing import Optional

# warnings.warn messages (regular expressions matched at the start of the message)
KNOWN_WARNINGS = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed\. Falling back to Torch Norm",
    r"full scope is deprecated",
    r"\w+ is experimental and still under active development",
)
# logging messages, by the logger that emits them
KNOWN_LOG_MESSAGES = {
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
    "torch.utils.cpp_extension": "No CUDA runtime is found",
}


class _Drop(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


_QUIETED = []  # whether quiet() ran in this process


def quiet() -> None:
    """Silences the known notices in this process (idempotent); call before megatron-core
    is imported."""
    _QUIETED.append(True)
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, prefix in KNOWN_LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(prefix))


def environment_line(gpu: bool) -> Optional[str]:
    """One line on what is missing where megatron-core would have warned, else None."""
    missing = [name for name, module in (("Transformer Engine", "transformer_engine"),
                                         ("Apex", "apex"))
               if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    where = "a GPU" if gpu else "the CPU"
    if "Transformer Engine" in missing:
        what = (f"megatron-core's local layers with torch norms, optimizers and tensor kernels "
                f"run on {where} (no FP8; attention is torch's SDPA, each packed segment "
                f"on its own, unless a softmax offset keeps megatron-core's)")
    else:  # Transformer Engine's layers run; Apex's fused optimizers and kernels are absent
        what = "Transformer Engine's layers run, with torch optimizers and tensor kernels"
    quieted = ("; megatron-core's notices about it and its deprecations are silenced"
               if _QUIETED else "")
    return f"{' and '.join(missing)} not installed: {what}{quieted}"
