"""What resuming checks: the checkpoint's config, and the files it was trained from, against
this run's.

Keys are the YAML names a user writes (``optimizer.weight_decay``, ``model.num_layers``). A
change that alters the optimisation (the loss, the model, the optimizer, the global batch,
the seed, the data's content or how it is tokenised and split, the reference weights) is
refused, naming every such key with both values, unless ``train.resume_allow_changes`` lists
the key or its section; an allowed change then takes effect from the resumed step on (the
trainer rebuilds the optimizer's settings and the learning-rate schedule from this run's
config). So is a tokenizer or weight directory whose files changed in place (same path, other
files: ``adadpo_megatron.training.fingerprints``). The expert-parallel size cannot change:
the experts' optimizer state is saved per expert-parallel rank. Other changes (max_steps,
intervals, logging, the rest of the parallel layout, micro-batch size, packing) do not
change what is computed and are accepted and printed.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

# keys (or sections, ending in ".") whose change alters the optimisation
REFUSED = ("loss.", "model.", "optimizer.", "train.global_batch_size", "train.seed",
           "train.dtype", "train.stage", "data.format", "data.tokenizer", "data.seq_length",
           "data.max_prompt_length", "data.prompt_truncation", "data.skip_invalid", "data.split",
           "data.eval_fraction", "data.eval_seed", "data.content", "reference.load")
# never resumable, allowed or not: why, and what to do instead
FIXED = {"parallel.expert_model_parallel_size": (
    "the experts' optimizer state is saved per expert-parallel rank and cannot be resharded; "
    "to continue at another expert-parallel size, start a new run from this checkpoint's "
    "weights (model.load=<the checkpoint>; the optimizer state restarts)")}
# not compared: how to resume is not what is computed
IGNORED = ("train.resume", "train.overwrite", "train.resume_allow_changes")
# the containers whose keys a user writes one level up: model.transformer.num_layers is
# model.num_layers in the YAML, optimizer.megatron.lr is optimizer.lr
_NESTED = {"model": "transformer", "optimizer": "megatron"}

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
    for section, inner in _NESTED.items():
        values = tree.get(section, {})
        tree[section] = {**{k: v for k, v in values.items() if k != inner},
                         **(values.get(inner) or {})}
    data, train = tree.get("data", {}), tree.get("train", {})
    if data.get("eval_seed") is None and "seed" in train:
        data["eval_seed"] = train["seed"]
    return _flatten(tree)


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(key == p.rstrip(".") or key.startswith(p if p.endswith(".") else p + ".")
               for p in patterns)


def _depends_on_model_load(view: Mapping[str, Any]) -> bool:
    """Whether model.load still matters once the checkpoint holds the weights: it is the base
    LoRA adapters adapt, or the resident reference's weights."""
    return bool(view.get("model.lora.rank")) or (
        view.get("reference.mode") == "resident" and not view.get("reference.load"))


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> List[Change]:
    """[(YAML key, saved value, current value)] for every key that differs."""
    old, new = yaml_view(saved), yaml_view(current)
    ignored = list(IGNORED)
    if not (_depends_on_model_load(old) or _depends_on_model_load(new)):
        ignored.append("model.load")  # the checkpoint holds the weights
    # megatron-core TransformerConfig keys the user set in either run: architecture
    architecture = {f"model.{k}" for config in (saved, current)
                    for k in ((config.get("model") or {}).get("transformer") or {})}
    changes = []
    for key in sorted(set(old) | set(new)):
        if _matches(key, ignored):
            continue
        if key not in old or key not in new:
            # a field one version of the package has and the other not (its default then
            # applies); but a TransformerConfig key the user set or dropped is a change
            if key not in architecture:
                continue
        a, b = old.get(key), new.get(key)
        if a != b:
            changes.append((key, a, b))
    return changes


def file_changes(saved: Mapping[str, str], current: Mapping[str, str],
                 saved_config: Mapping[str, Any], current_config: Mapping[str, Any]
                 ) -> List[Change]:
    """The input files that changed in place: keys whose path is the same in both configs
    but whose ``source_fingerprints`` differ."""
    old, new = yaml_view(saved_config), yaml_view(current_config)
    if not (_depends_on_model_load(old) or _depends_on_model_load(new)):
        saved = {k: v for k, v in saved.items() if k != "model.load"}
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
                 current_files: Optional[Mapping[str, str]] = None) -> List[Change]:
    """Raises ValueError naming each refused change; returns the accepted ones.

    Args:
        saved, current: ``to_dict`` of the checkpoint's and this run's config, each with a
            ``data.content`` entry (the data's content hash) where known.
        allowed: train.resume_allow_changes (YAML keys or sections).
        saved_files, current_files: ``source_fingerprints`` of the checkpoint's run and of
            this one, where the checkpoint recorded them.
    """
    changes = config_changes(saved, current)
    if saved_files is not None and current_files is not None:
        changes += file_changes(saved_files, current_files, saved, current)
    fixed = [c for c in changes if c[0] in FIXED]
    if fixed:
        key, a, b = fixed[0]
        raise ValueError(f"resuming with {key}={b!r} (the checkpoint's is {a!r}) is not "
                         f"possible: {FIXED[key]}")
    refused = [c for c in changes if _matches(c[0], REFUSED) and not _matches(c[0], allowed)]
    if refused:
        listed = "; ".join(_describe(c) for c in refused)
        keys = ", ".join(dict.fromkeys(k for k, _, _ in refused))
        raise ValueError(
            f"resuming would change the optimisation: {listed}. Undo the change, start a new "
            "run (another train.output_dir), or list the keys in train.resume_allow_changes "
            f"(e.g. [{keys}])")
    return changes
