"""What resuming checks: the checkpoint's config, and the files it was trained from, against
this run's.

Keys are the YAML names a user writes (``optimizer.weight_decay``, ``model.num_layers``). A
change that alters the optimisation (the loss, the model, the optimizer, the global batch,
the seed, the data's content or how it is tokenised and split, the reference weights) is
refused, naming every such key with both values, unless ``train.resume_allow_changes`` lists
the key or its section; an allowed change then takes effect from the resumed step on (the
trainer rebuilds the optimizer's settings and the learning-rate schedule from this run's
config). So is a tokenizer or weight directory whose files changed in place (same path, other
files: ``fingerprints``). Some changes cannot take effect at all and are refused whatever is
allowed: the architecture (the checkpoint's tensor shapes), LoRA's rank and targets or LoRA
itself, the optimizer's kind (its state), the expert-parallel size (the experts' optimizer
state is saved per expert-parallel rank). Other changes (max_steps,
intervals, logging, the rest of the parallel layout, micro-batch size, packing) do not
change what is computed and are accepted and printed; micro-batch size and packing do where
the loss averages over each micro-batch's tokens (loss.nll_reduction token), and are then
refused too.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from adadpo_megatron.training.run_config import NESTED, OptimizerSection

# keys (or sections, ending in ".") whose change alters the optimisation
REFUSED = ("loss.", "model.", "optimizer.", "train.global_batch_size", "train.seed",
           "train.dtype", "train.stage", "data.format", "data.tokenizer", "data.seq_length",
           "data.max_prompt_length", "data.prompt_truncation", "data.skip_invalid", "data.split",
           "data.eval_fraction", "data.eval_seed", "data.content", "reference.load")
# never resumable, allowed or not (see _never_resumable): why, and what to do instead
_RESTART = ("start a new run from this checkpoint's weights (model.load=<the checkpoint>; "
            "the optimizer state restarts)")
_EP = ("the experts' optimizer state is saved per expert-parallel rank and cannot be "
       f"resharded; to continue at another expert-parallel size, {_RESTART}")
_SHAPES = ("the checkpoint's tensors have the shapes of its architecture; to change it, start "
           "a new run (another train.output_dir)")
_LORA = ("the checkpoint holds the tensors of its own LoRA settings (adapters of that rank "
         "and those targets, or the whole model without adapters); to change them, " + _RESTART)
_OPTIMIZER = ("the checkpoint's optimizer state (Adam's moments, SGD's momentum) is that of "
              f"its own optimizer; to change it, {_RESTART}")
# model keys that decide tensor shapes
ARCHITECTURE = tuple(f"model.{k}" for k in (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "kv_channels", "num_moe_experts", "moe_ffn_hidden_size", "vocab_size",
    "make_vocab_size_divisible_by", "gated_linear_unit", "add_bias_linear", "add_qkv_bias",
    "qk_layernorm", "share_embeddings_and_output_weights", "position_embedding_type",
    "activation"))
# what changes the loss when it averages over each micro-batch's tokens (nll_reduction token)
MICRO_BATCH_KEYS = ("train.micro_batch_size", "data.packing", "data.max_tokens_per_micro_batch",
                    "parallel.data_parallel_size", "parallel.pipeline_model_parallel_size",
                    "parallel.virtual_pipeline_model_parallel_size")
# not compared: how to resume is not what is computed
IGNORED = ("train.resume", "train.overwrite", "train.resume_allow_changes")

Change = Tuple[str, Any, Any]


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def yaml_view(config: Mapping[str, Any]) -> Dict[str, Any]:
    """``to_dict`` of a run config (as checkpoints save it) as {YAML key: value}, with
    ``data.eval_seed`` resolved (unset means train.seed)."""
    tree = {section: dict(values) for section, values in config.items()
            if isinstance(values, dict)}
    for section, inner in NESTED.items():
        values = tree.get(section, {})
        tree[section] = {**{k: v for k, v in values.items() if k != inner},
                         **(values.get(inner) or {})}
    # checkpoints written before the optimizer section filled in its defaults lack them
    tree["optimizer"] = {**OptimizerSection.DEFAULTS, **tree.get("optimizer", {})}
    data, train = tree.get("data", {}), tree.get("train", {})
    if data.get("eval_seed") is None and "seed" in train:
        data["eval_seed"] = train["seed"]
    return _flatten(tree)


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(key == p.rstrip(".") or key.startswith(p if p.endswith(".") else p + ".")
               for p in patterns)


# where a run's initial weights come from: model.load, else model.hf
INITIAL_WEIGHTS = ("model.load", "model.hf")


def depends_on_initial_weights(view: Mapping[str, Any]) -> bool:
    """Whether a resumed run (``yaml_view`` of its config) still reads its initial weights
    (model.load or model.hf) once the checkpoint holds the policy's: they are the base LoRA
    adapters adapt, or the resident reference's weights."""
    return bool(view.get("model.lora.rank")) or (
        view.get("reference.mode") == "resident" and not view.get("reference.load"))


def _never_resumable(change: Change) -> Optional[str]:
    """Why a change cannot be resumed whatever train.resume_allow_changes says, or None."""
    key, a, b = change
    if key == "parallel.expert_model_parallel_size":
        return _EP
    if key in ARCHITECTURE:
        return _SHAPES
    if key == "model.lora.rank" or key == "model.lora.target_modules" or (
            key.startswith("model.lora") and (a is None or b is None)):
        return _LORA
    if key == "optimizer.optimizer" or (key == "optimizer.sgd_momentum"
                                        and bool(a) != bool(b)):
        return _OPTIMIZER
    return None


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> List[Change]:
    """[(YAML key, saved value, current value)] for every key that differs."""
    old, new = yaml_view(saved), yaml_view(current)
    ignored = list(IGNORED)
    if not (depends_on_initial_weights(old) or depends_on_initial_weights(new)):
        ignored += INITIAL_WEIGHTS  # the checkpoint holds the weights
    # megatron-core's TransformerConfig and OptimizerConfig keys the user set in either run:
    # set in one and not the other is a change (megatron-core's default applies in the other)
    user_set = {f"{section}.{k}" for config in (saved, current)
                for section, inner in NESTED.items()
                for k in ((config.get(section) or {}).get(inner) or {})}
    changes = []
    for key in sorted(set(old) | set(new)):
        if _matches(key, ignored):
            continue
        if (key not in old or key not in new) and key not in user_set \
                and not _in_a_subtree_set_to_none(key, old if key in new else new):
            continue  # a field one version of the package has and the other not
        a, b = old.get(key), new.get(key)
        if a != b:
            changes.append((key, a, b))
    return changes


def _in_a_subtree_set_to_none(key: str, other: Mapping[str, Any]) -> bool:
    """Whether ``other`` has a parent of ``key`` set to None: ``model.lora.rank`` of a run
    with LoRA against ``model.lora: null`` of one without."""
    parts = key.split(".")
    return any(other.get(".".join(parts[:i]), 0) is None for i in range(2, len(parts)))


def file_changes(saved: Mapping[str, str], current: Mapping[str, str],
                 saved_config: Mapping[str, Any], current_config: Mapping[str, Any]
                 ) -> List[Change]:
    """The input files that changed in place: keys whose path is the same in both configs
    but whose ``source_fingerprints`` differ."""
    old, new = yaml_view(saved_config), yaml_view(current_config)
    if not (depends_on_initial_weights(old) or depends_on_initial_weights(new)):
        saved = {k: v for k, v in saved.items() if k not in INITIAL_WEIGHTS}
    return [(key, f"files {saved[key]}", f"files {current[key]}")
            for key in sorted(set(saved) & set(current))
            if saved[key] != current[key] and old.get(key) == new.get(key)]


def _describe(change: Change) -> str:
    key, a, b = change
    if isinstance(a, str) and a.startswith("files "):
        return (f"{key}: its files changed in place since the checkpoint (same path, other "
                "files: replaced, retrained or copied)")
    return f"{key}: {a!r} in the checkpoint, {b!r} now"


def check_resume(saved: Mapping[str, Any], current: Mapping[str, Any],
                 allowed: Sequence[str], saved_files: Optional[Mapping[str, str]] = None,
                 current_files: Optional[Mapping[str, str]] = None,
                 micro_batch_dependent: bool = False) -> List[Change]:
    """Raises ValueError naming each refused change; returns the accepted ones.

    Args:
        saved, current: ``to_dict`` of the checkpoint's and this run's config, each with a
            ``data.content`` entry (the data's content hash) where known.
        allowed: train.resume_allow_changes (YAML keys or sections).
        saved_files, current_files: ``source_fingerprints`` of the checkpoint's run and of
            this one, where the checkpoint recorded them.
        micro_batch_dependent: the loss averages over each micro-batch's tokens
            (LossConfig.token_mean_per_micro_batch): how pairs are grouped into micro-batches
            (MICRO_BATCH_KEYS) then changes what is computed too.
    """
    changes = config_changes(saved, current)
    if saved_files is not None and current_files is not None:
        changes += file_changes(saved_files, current_files, saved, current)
    for change in changes:
        reason = _never_resumable(change)
        if reason:
            key, a, b = change
            raise ValueError(f"resuming with {key}={b!r} (the checkpoint's is {a!r}) is not "
                             f"possible, whatever train.resume_allow_changes says: {reason}")
    refusing = REFUSED + (MICRO_BATCH_KEYS if micro_batch_dependent else ())
    refused = [c for c in changes if _matches(c[0], refusing) and not _matches(c[0], allowed)]
    if refused:
        listed = "; ".join(_describe(c) for c in refused)
        keys = ", ".join(dict.fromkeys(k for k, _, _ in refused))
        raise ValueError(
            f"resuming would change the optimisation: {listed}. Undo the change, start a new "
            "run (another train.output_dir), or list the keys in train.resume_allow_changes "
            f"(e.g. [{keys}])")
    return changes
