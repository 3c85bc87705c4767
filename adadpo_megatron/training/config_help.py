"""A run config for people: every key with its default and one line (``adadpo-train
--help``), and a config as the YAML it amounts to, defaults filled and overrides applied
(``adadpo-train --print-config``, and ``output_dir/config.yaml`` of every run).

The one-line descriptions are the first sentence of each key in its section's ``Fields:``
docstring, so the help cannot drift from the code's own documentation.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Dict, List

import yaml

from adadpo_megatron.mcore.lora import LoRAConfig
from adadpo_megatron.mcore.model_config import ModelConfig, ParallelConfig
from adadpo_megatron.ops.loss_config import LossConfig
from adadpo_megatron.training.run_config import (
    NESTED,
    PATHS_RULE,
    DataConfig,
    OptimizerSection,
    ReferenceConfig,
    RunConfig,
    TrainConfig,
    to_dict,
)

SECTION_CLASSES = {"model": ModelConfig, "parallel": ParallelConfig, "loss": LossConfig,
                   "data": DataConfig, "reference": ReferenceConfig,
                   "optimizer": OptimizerSection, "train": TrainConfig}
# what the nested containers (NESTED) take, for the help
_OPEN_KEYS = {"model": "any megatron-core TransformerConfig field (num_layers, hidden_size, "
                       "num_attention_heads, ffn_hidden_size, fp8, recompute_granularity, ...)",
              "optimizer": "any megatron-core OptimizerConfig field (adam_beta1, adam_beta2, "
                           "adam_eps, sgd_momentum, use_distributed_optimizer, ...)"}


# sections' keys that hold a section of their own: (section, key) -> its dataclass
SUBSECTIONS = {("model", "lora"): LoRAConfig}
# the optimizer keys this project gives defaults (OptimizerSection.DEFAULTS)
OPTIMIZER_KEYS = {"optimizer": '"adam" or "sgd" (megatron-core\'s)',
                  "lr": "the peak learning rate",
                  "min_lr": "the learning rate the decay ends at",
                  "weight_decay": "weight decay, >= 0",
                  "clip_grad": "the clip on the global gradient norm; 0 turns it off"}


def field_descriptions(cls) -> Dict[str, str]:
    """{field: the first sentence of its entry} from the class's ``Fields:`` docstring."""
    doc = cls.__doc__ or ""
    if "Fields:" not in doc:
        return {}
    entries: Dict[str, List[str]] = {}
    current = None
    for line in doc.split("Fields:", 1)[1].splitlines():
        match = re.match(r"^\s{4,8}(\w+): (.*)$", line)
        if match and (current is None or len(line) - len(line.lstrip()) <= 8):
            current = match.group(1)
            entries[current] = [match.group(2).strip()]
        elif current is not None and line.strip():
            entries[current].append(line.strip())
        elif current is not None and not line.strip() and entries[current]:
            current = None  # a blank line ends the block
    return {name: _first_sentence(" ".join(words)) for name, words in entries.items()}


def _first_sentence(text: str) -> str:
    match = re.search(r"(?<!e\.g)(?<!i\.e)(?<! al)\.\s", text + " ")
    return text[:match.start() + 1] if match else text


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def key_help() -> str:
    """Every section and key of a run config: ``section.key = default: what it is``."""
    lines = ["run config keys (YAML sections; override any with section.key=value;",
             f"{PATHS_RULE}):"]
    for section, cls in SECTION_CLASSES.items():
        lines.append(f"  {section}:")
        docs = field_descriptions(cls)
        for f in dataclasses.fields(cls):
            if f.name == NESTED.get(section):
                if section == "optimizer":
                    for key, value in OptimizerSection.DEFAULTS.items():
                        lines.append(f"    {key} = {value!r}: {OPTIMIZER_KEYS[key]}")
                lines.append(f"    ...: {_OPEN_KEYS[section]}")
                continue
            text = docs.get(f.name, "")
            lines.append(f"    {f.name} = {_default(f)!r}" + (f": {text}" if text else ""))
            sub = SUBSECTIONS.get((section, f.name))
            if sub is not None:
                sub_docs = field_descriptions(sub)
                lines += [f"      {f.name}.{g.name} = {_default(g)!r}: {sub_docs.get(g.name, '')}"
                          for g in dataclasses.fields(sub)]
    return "\n".join(lines)


def effective_config(config: RunConfig) -> Dict[str, Dict[str, Any]]:
    """The config as YAML sections hold it: every key, defaults filled in, the nested
    containers (model.transformer, optimizer.megatron) written one level up as in a config
    file."""
    out = {}
    for section, values in to_dict(config).items():
        inner = NESTED.get(section)
        if inner is not None:
            values = {**{k: v for k, v in values.items() if k != inner}, **values[inner]}
        out[section] = values
    if config.train.num_epochs is not None:  # max_steps is derived from it, not set
        out["train"]["max_steps"] = None
    return out


def effective_yaml(config: RunConfig) -> str:
    """``effective_config`` as YAML that ``load_run_config`` reads back to the same config,
    with a header naming its source and the working directory its relative paths start from
    (PATHS_RULE)."""
    header = (f"# the effective config of {config.source or 'a config built in code'}: "
              "defaults filled in, overrides applied\n# (relative paths are relative to the "
              f"working directory, here {Path.cwd()})\n")
    return header + yaml.safe_dump(effective_config(config), sort_keys=False)
