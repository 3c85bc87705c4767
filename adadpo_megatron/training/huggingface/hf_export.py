"""adadpo-export-hf: a checkpoint as a Hugging Face model directory that transformers (and
vLLM) load.

    adadpo-export-hf runs/llama31_8b_adadpo out/llama31_8b_adadpo      # a run: its latest
    adadpo-export-hf runs/x/checkpoints/step_0000100 out/x_step100     # one checkpoint
    adadpo-export-hf runs/lora_run out/adapter --peft                   # LoRA: PEFT directory

Writes config.json, model-0000k-of-0000n.safetensors with model.safetensors.index.json,
generation_config.json, the tokenizer's files and adadpo_export.json (which marks the
directory as an export, so that exporting into it again needs no --overwrite), into a
temporary sibling renamed into place (output_dirs). One CPU process, from a checkpoint of any
TP/PP/VPP layout (its tensors are stored under global names), reading a layer at a time, so
it never holds more than one layer besides the shard being written.

Tensors are read with torch.distributed.checkpoint directly (no process group, no GPU, no
megatron-core model), one region at a time. The architecture comes from the run's model
section (saved in every checkpoint); when the run started from ``model.hf`` (or the
checkpoint is an adadpo-import-hf one), its config.json, generation config and tokenizer are
carried over, so the export differs from the source only in the weights. A LoRA run's
checkpoint holds its adapters only: they are merged into its base (lora_export).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch
from safetensors.torch import save_file

from adadpo_megatron.data.tokenizers import TOKENIZER_FILES
from adadpo_megatron.mcore.hf_mapping import HFArchitecture, hf_tensors, read_architecture
from adadpo_megatron.training.checkpointing.checkpoint import STATE_FILE, resolve_checkpoint
from adadpo_megatron.training.huggingface import lora_export, output_dirs
from adadpo_megatron.training.huggingface.dcp_reader import layer_slices, tensor_metadata
from adadpo_megatron.training.huggingface.hf_import import SOURCE_FILE
from adadpo_megatron.training.run_config import load_run_config, to_dict

SHARD_BYTES = 5 * 1024**3
EXPORT_FILE = "adadpo_export.json"  # marks a directory this command wrote (output_dirs)
@dataclass
class _Origin:
    """What a checkpoint records about where it came from."""

    source: Optional[Path]  # the Hugging Face directory of the architecture and weights
    run: Optional[dict]  # the saved run config (a run checkpoint's)
    tokenizer: Optional[Path]
    base: Optional[Path] = None  # a LoRA run's model.load (the base its adapters adapt)


def _source_of(checkpoint: Path, config: Optional[str] = None) -> _Origin:
    """Where a checkpoint came from, as far as it records it; for one that records nothing
    (Megatron-LM's, e.g. saved by pretrain() with adadpo_megatron.integrations.megatron_lm),
    the run config ``config`` describes it (its model section and data.tokenizer)."""

    records = (checkpoint / SOURCE_FILE).is_file() or (checkpoint / STATE_FILE).is_file()
    if config is not None:
        if records:
            raise ValueError(f"{checkpoint} records its own run or source; --config is for a "
                             "checkpoint that records neither (Megatron-LM's): leave it out")
        return _origin_from_config(config)
    if (checkpoint / SOURCE_FILE).is_file():
        source = Path(json.loads((checkpoint / SOURCE_FILE).read_text())["directory"])
        return _Origin(source, None, source)
    if not (checkpoint / STATE_FILE).is_file():
        raise FileNotFoundError(f"{checkpoint}: neither a run checkpoint ({STATE_FILE}) nor "
                                f"a Hugging Face import ({SOURCE_FILE}); for a Megatron-LM "
                                "checkpoint, name the run config that describes its model "
                                "with --config")
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
    sources = state.get("sources") or {}
    hf, tokenizer, load = sources.get("hf"), sources.get("tokenizer"), sources.get("load")
    source = Path(hf) if hf else None
    if source is None and load and (Path(load) / SOURCE_FILE).is_file():
        # model.load was an adadpo-import-hf checkpoint: its source is the architecture's
        source = _source_of(Path(load)).source
    return _Origin(source, state["config"],
                   Path(tokenizer) if tokenizer and tokenizer != "byte" else None,
                   Path(load) if load else None)


def _origin_from_config(path: str) -> _Origin:
    """The origin a run config describes: its model section, model.hf, data.tokenizer."""
    config = load_run_config(path)
    if config.model.lora is not None:
        raise ValueError(f"--config {path}: a LoRA config describes adapters, which a "
                         "Megatron-LM checkpoint does not hold")
    hf = config.resolve(config.model.hf)
    tokenizer = None if config.data.tokenizer == "byte" else Path(config.tokenizer_spec())
    return _Origin(hf.resolve() if hf else None, to_dict(config), tokenizer)


def _architecture(source: Optional[Path], run: Optional[dict]):
    """The HFArchitecture of the checkpoint: the source's, or one written from the run's
    model section (a Llama layout, checked)."""

    if source is not None and (source / "config.json").is_file():
        return read_architecture(source)
    model = run["model"]
    t = model["transformer"]
    llama_like = (t.get("normalization") == "RMSNorm" and t.get("gated_linear_unit")
                  and model["activation"] == "swiglu" and t.get("add_bias_linear") is False
                  and model["position_embedding_type"] == "rope")
    if not llama_like:
        raise ValueError("the run's model is not a Llama layout (RMSNorm, SwiGLU, RoPE, no "
                         "linear biases), so it has no Hugging Face Llama equivalent")
    heads = t["num_attention_heads"]
    experts = t.get("num_moe_experts")
    if experts and not t.get("qk_layernorm"):
        raise ValueError("the run's model has experts but no q/k norms: of the mixture-of-"
                         "experts models only Qwen3-MoE is mapped to Hugging Face")
    model_type = ("qwen3_moe" if experts else "qwen3" if t.get("qk_layernorm") else
                  "qwen2" if t.get("add_qkv_bias") else "llama")
    moe = {}
    if experts:
        moe = dict(num_experts=experts, moe_ffn_hidden_size=t["moe_ffn_hidden_size"],
                   moe_router_topk=t["moe_router_topk"],
                   moe_norm_topk_prob=not t.get("moe_router_pre_softmax", False))
    return HFArchitecture(
        model_type=model_type,
        num_layers=t["num_layers"], hidden_size=t["hidden_size"], num_attention_heads=heads,
        num_query_groups=t.get("num_query_groups") or heads,
        head_dim=t.get("kv_channels") or t["hidden_size"] // heads,
        ffn_hidden_size=t["ffn_hidden_size"], vocab_size=0,  # set from the checkpoint
        rms_norm_eps=t.get("layernorm_epsilon", 1e-5), rope_theta=float(model["rotary_base"]),
        tied=bool(model["share_embeddings_and_output_weights"]),
        qkv_bias=bool(t.get("add_qkv_bias")),
        rope_scaling_factor=model["rope_scaling_factor"] if model.get("rope_scaling") else None,
        max_position_embeddings=run["data"]["seq_length"], dtype="float32",
        qk_layernorm=bool(t.get("qk_layernorm")), **moe)


def _write_shards(tensors: Iterator[Tuple[str, torch.Tensor]], out: Path,
                  shard_bytes: int) -> Dict[str, str]:
    """Safetensors shards of at most ``shard_bytes`` (a tensor never split) and their index."""
    pending: Dict[str, torch.Tensor] = {}
    size, shards = 0, []

    def flush():
        nonlocal pending, size
        if pending:
            shards.append(pending)
            save_file(pending, str(out / f"shard-{len(shards)}.tmp"), metadata={"format": "pt"})
            pending, size = {}, 0

    total = 0
    for name, tensor in tensors:
        tensor = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if pending and size + nbytes > shard_bytes:
            flush()
        pending[name] = tensor.clone()
        size += nbytes
        total += nbytes
    flush()
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        final = (f"model-{i:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1
                 else "model.safetensors")
        (out / f"shard-{i}.tmp").rename(out / final)
        weight_map.update({name: final for name in shard})
        shard.clear()  # the tensors are on disk
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
            indent=2))
    return weight_map


def export_checkpoint(path, out, *, dtype: Optional[str] = None,
                      shard_bytes: int = SHARD_BYTES, peft: bool = False,
                      overwrite: bool = False, config: Optional[str] = None) -> Path:
    """Writes the Hugging Face directory ``out`` for the checkpoint (or run) ``path``; a LoRA
    run's adapters merged into its base, or with ``peft`` as a PEFT adapter directory.

    ``out`` is written whole into a temporary sibling and renamed into place (output_dirs),
    so that it holds this export's files and nothing else. It may not be, hold or lie inside
    what the export reads (``_protected``); a non-empty ``out`` that is not an earlier
    export (no adadpo_export.json) is replaced only with ``overwrite``. ``config``: the run
    config describing a checkpoint that records no run (Megatron-LM's).
    """

    checkpoint = resolve_checkpoint(path)
    if not (checkpoint / "metadata.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a megatron-core distributed checkpoint")
    origin = _source_of(checkpoint, config)
    with output_dirs.claimed(out, _protected(checkpoint, origin), EXPORT_FILE,
                             overwrite) as out:
        with output_dirs.atomic_directory(out) as tmp:
            _export(checkpoint, origin, tmp, dtype, shard_bytes, peft)
            (tmp / EXPORT_FILE).write_text(json.dumps(
                {"checkpoint": str(checkpoint.resolve()), "peft": peft}, indent=1))
    return out


def _protected(checkpoint: Path, origin: _Origin) -> Dict[str, Optional[Path]]:
    """{what: path} that an export's OUT may not be, hold or lie inside: what it reads, and a
    run's output_dir (``<output_dir>/checkpoints/step_N``)."""
    run_dir = (checkpoint.resolve().parent.parent
               if origin.run is not None and checkpoint.resolve().parent.name == "checkpoints"
               else None)
    from_hf = origin.run is not None and origin.run["model"].get("hf")
    return {"the checkpoint": checkpoint, "the run's output_dir": run_dir,
            "the run's model.hf" if from_hf else "the Hugging Face model it came from":
            origin.source, "the run's model.load": origin.base,
            "the tokenizer directory": origin.tokenizer}


def _export(checkpoint: Path, origin: _Origin, out: Path, dtype: Optional[str],
            shard_bytes: int, peft: bool) -> None:
    """Writes the export into the empty directory ``out``."""

    lora = origin.run["model"]["lora"] if lora_export.is_lora_run(origin.run) else None
    if peft and lora is None:
        raise ValueError(f"{checkpoint} is not a LoRA run's checkpoint (model.lora): it has no "
                         "adapters to write as a PEFT directory")
    if lora is not None and origin.source is None and origin.base is None:
        raise ValueError(f"{checkpoint}: a LoRA checkpoint holds adapters only, and its run "
                         "recorded no base (model.hf or model.load) to merge them into")
    arch = _architecture(origin.source, origin.run)
    metadata = tensor_metadata(checkpoint)
    weights = metadata if lora is None or origin.base is None else tensor_metadata(origin.base)
    if arch.vocab_size == 0:
        arch = replace(arch, vocab_size=weights["embedding.word_embeddings.weight"][0][0])
    if peft:
        lora_export.write_peft_adapter(checkpoint, metadata, arch, lora, out, origin.source)
        _copy_tokenizer(origin, out)  # PEFT directories carry it too (TRL saves it there)
        return
    cast = getattr(torch, dtype) if dtype else None
    # a LoRA run on model.hf: its safetensors, adapters merged, under their own names and dtype
    merged_into_hf = lora is not None and origin.base is None

    def hf_items():
        if merged_into_hf:
            yield from lora_export.merged_hf_tensors(origin.source, checkpoint, metadata, arch,
                                                     lora["alpha"] / lora["rank"])
            return
        megatron = (layer_slices(checkpoint, metadata, arch.num_layers) if lora is None else
                    lora_export.merged_megatron_tensors(origin.base, weights, checkpoint,
                                                        metadata, arch.num_layers,
                                                        lora["alpha"] / lora["rank"]))
        for name, value in megatron:
            yield from hf_tensors(name, value, arch)

    def cast_items():
        for name, tensor in hf_items():
            yield name, tensor.to(cast) if cast is not None else tensor

    _write_shards(cast_items(), out, shard_bytes)
    _write_config(out, arch, origin.source,
                  dtype or (arch.dtype if merged_into_hf else _dtype_name(weights)))
    _copy_tokenizer(origin, out, ("generation_config.json",))
    if not (out / "generation_config.json").is_file():
        from transformers import AutoConfig, GenerationConfig  # seconds to import: on use

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(out)).save_pretrained(out)


def _copy_tokenizer(origin: _Origin, out: Path, extra=()) -> None:
    """The tokenizer's files (and ``extra``), from data.tokenizer's directory, else the
    model's."""
    for name in TOKENIZER_FILES + tuple(extra):
        for folder in (origin.tokenizer, origin.source):
            if folder is not None and (folder / name).is_file():
                shutil.copy2(folder / name, out / name)
                break


def _dtype_name(metadata) -> str:
    return str(next(iter(metadata.values()))[1]).replace("torch.", "")


def _write_config(out: Path, arch, source: Optional[Path], dtype: str) -> None:
    if source is not None and (source / "config.json").is_file():
        config = json.loads((source / "config.json").read_text())
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
        (out / "config.json").write_text(json.dumps(config, indent=2))
        return
    import transformers  # seconds to import: only where no source config.json is carried over

    rope = {"rope_type": "default", "rope_theta": arch.rope_theta}
    if arch.rope_scaling_factor is not None:
        rope = {"rope_type": "llama3", "rope_theta": arch.rope_theta,
                "factor": arch.rope_scaling_factor, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config_class = {"qwen3_moe": transformers.Qwen3MoeConfig, "qwen3": transformers.Qwen3Config,
                    "qwen2": transformers.Qwen2Config,
                    "llama": transformers.LlamaConfig}[arch.model_type]
    extra = {}
    if arch.model_type.startswith("qwen3"):
        extra["attention_bias"] = arch.qkv_bias
    if arch.num_experts:
        extra.update(num_experts=arch.num_experts, moe_intermediate_size=arch.moe_ffn_hidden_size,
                     num_experts_per_tok=arch.moe_router_topk,
                     norm_topk_prob=arch.moe_norm_topk_prob, decoder_sparse_step=1,
                     mlp_only_layers=[])
    config = config_class(**extra,
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size, num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups, head_dim=arch.head_dim,
        rms_norm_eps=arch.rms_norm_eps, tie_word_embeddings=arch.tied,
        max_position_embeddings=max(arch.max_position_embeddings, 8192 + 1),
        rope_parameters=rope, dtype=dtype)
    config.save_pretrained(out)
