"""A LoRA run's checkpoint out: merged into its base, or as a PEFT adapter directory.

A LoRA checkpoint holds the adapters only (adadpo_megatron.mcore.lora), stacked over layers
under global names (``decoder.layers.self_attention.linear_qkv_lora.lora_a``: [layers, r,
in]). Exporting reads one layer's adapters at a time and adds ``scale * B A`` to that layer's
base weights, in float32, cast back to the base's dtype; the base is the run's model.hf
(safetensors, whose tensors are then written under their own names) or model.load (a
torch_dist checkpoint, mapped as a full checkpoint is). Since megatron-core's fused
linear_qkv and linear_fc1 map onto several Hugging Face linears row-wise, their B splits as
the weight does while A is shared: q_proj, k_proj and v_proj (gate_proj and up_proj) get the
same lora_A, which is what PEFT's LoRA computes for them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch
from safetensors.torch import save_file

from adadpo_megatron.mcore.hf_mapping import HFTensors, hf_prefix, hf_tensors
from adadpo_megatron.mcore.lora import SUFFIX, TARGETS, is_adapter_name
from adadpo_megatron.training.huggingface.dcp_reader import (
    layer_regions,
    layer_slices,
    read_regions,
)

_LAYER = re.compile(r"(?:.*\.)?layers\.(\d+)\.")
_PEFT_MODULES = {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_proj": ("o_proj",),
                 "linear_fc1": ("gate_proj", "up_proj"), "linear_fc2": ("down_proj",)}


def is_lora_run(run: Optional[dict]) -> bool:
    return bool(run and (run.get("model") or {}).get("lora"))


def layer_adapters(checkpoint: Path, metadata, layer: int
                   ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """{global name of the adapted weight: (A [r, in], B [out, r]), full} of one layer."""
    adapters = {key: value for key, value in metadata.items() if is_adapter_name(key)}
    values = read_regions(checkpoint, layer_regions(adapters, layer))
    pairs = {}
    for target, (parent, _) in TARGETS.items():
        prefix = f"decoder.layers.{parent}.{target}{SUFFIX}."
        if prefix + "lora_a" in values:
            pairs[f"decoder.layers.{layer}.{parent}.{target}.weight"] = (
                values[prefix + "lora_a"][0], values[prefix + "lora_b"][0])
    return pairs


def layer_deltas(checkpoint: Path, metadata, layer: int, scale: float
                 ) -> Dict[str, torch.Tensor]:
    """{global weight name: scale * B A (float32)} of one layer."""
    return {name: (b.float() @ a.float()) * scale
            for name, (a, b) in layer_adapters(checkpoint, metadata, layer).items()}


def _layer_of(name: str) -> Optional[int]:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def _add(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (base.float() + delta).to(base.dtype)


def merged_megatron_tensors(base: Path, base_metadata, checkpoint: Path, metadata,
                            num_layers: int, scale: float) -> Iterator[Tuple[str, torch.Tensor]]:
    """(global name, full tensor) of the torch_dist checkpoint ``base`` (its
    ``tensor_metadata``) with the adapters of ``checkpoint`` merged in, a layer at a time."""
    current, deltas = None, {}
    for name, value in layer_slices(base, base_metadata, num_layers):
        layer = _layer_of(name)
        if layer is not None and layer != current:
            _check_used(deltas, current)
            current, deltas = layer, layer_deltas(checkpoint, metadata, layer, scale)
        yield name, _add(value, deltas.pop(name)) if name in deltas else value
    _check_used(deltas, current)


def merged_hf_tensors(source: Path, checkpoint: Path, metadata, arch, scale: float
                      ) -> Iterator[Tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) of the model in ``source`` with the adapters merged in:
    its tensors under their own names, a layer at a time."""

    tensors = HFTensors(source)
    prefix = hf_prefix(tensors)
    by_layer: Dict[Optional[int], list] = {}
    for name in sorted(tensors.weight_map):
        by_layer.setdefault(_layer_of(name), []).append(name)
    for name in by_layer.pop(None, []):
        yield name, tensors.get(name)
    for layer in range(arch.num_layers):
        deltas = {hf_name: part
                  for name, delta in layer_deltas(checkpoint, metadata, layer, scale).items()
                  for hf_name, part in hf_tensors(name, delta, arch, prefix)}
        for name in by_layer.get(layer, []):
            value = tensors.get(name)
            yield name, _add(value, deltas.pop(name)) if name in deltas else value
        _check_used(deltas, layer)


def _check_used(deltas: Dict[str, torch.Tensor], layer) -> None:
    if deltas:
        raise ValueError(f"the base has no tensor for the adapters of {sorted(deltas)} (layer "
                         f"{layer}): is the checkpoint a LoRA run on this base?")


def write_peft_adapter(checkpoint: Path, metadata, arch, lora: dict, out: Path,
                       base: Optional[Path]) -> Path:
    """``out`` as a PEFT LoRA adapter directory (adapter_config.json and
    adapter_model.safetensors) for the Hugging Face model ``arch`` describes; PEFT's scale
    lora_alpha / r is ours, alpha / rank."""

    tensors = {}
    for layer in range(arch.num_layers):
        for name, (a, b) in layer_adapters(checkpoint, metadata, layer).items():
            for hf_name, part in hf_tensors(name, b, arch, "base_model.model.model."):
                module = hf_name[: -len(".weight")]
                tensors[f"{module}.lora_A.weight"] = a.contiguous().clone()
                tensors[f"{module}.lora_B.weight"] = part.contiguous().clone()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = [m for t in lora["target_modules"] for m in _PEFT_MODULES[t]]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM",
              "base_model_name_or_path": str(base) if base is not None else None,
              "r": lora["rank"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"],
              "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "init_lora_weights": True, "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
