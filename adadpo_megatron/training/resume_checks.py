"""What resuming checks: the checkpoint's config against this run's.

A change that alters the optimisation (the loss, the model, the optimizer, the global batch,
the seed, the data's content or how it is tokenised and split, the reference weights) is
refused, naming every such key with both values, unless ``train.resume_allow_changes`` lists
the key or its section. Other changes (max_steps, intervals, logging, the parallel layout,
micro-batch size, packing) do not change what is computed and are accepted and printed.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

# keys (or sections, ending in ".") whose change alters the optimisation
REFUSED = ("loss.", "model.", "optimizer.", "train.global_batch_size", "train.seed",
           "train.dtype", "train.stage", "data.format", "data.tokenizer", "data.seq_length",
           "data.max_prompt_length", "data.prompt_truncation", "data.skip_invalid", "data.split",
           "data.eval_fraction", "data.content", "reference.load")
# where a checkpoint's weights come from on resume is the checkpoint itself (but for LoRA)
IGNORED = ("model.load", "train.resume", "train.overwrite", "train.resume_allow_changes")

Change = Tuple[str, Any, Any]


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(key == p.rstrip(".") or key.startswith(p if p.endswith(".") else p + ".")
               for p in patterns)


def config_changes(saved: Dict[str, Any], current: Dict[str, Any]) -> List[Change]:
    """[(dotted key, saved value, current value)] for every key that differs."""
    old, new = _flatten(saved), _flatten(current)
    # a LoRA checkpoint holds the adapters only: its base is model.load's, loaded again
    ignored = [k for k in IGNORED if k != "model.load" or not (old.get("model.lora.rank")
                                                               or new.get("model.lora.rank"))]
    changes = []
    for key in sorted(set(old) | set(new)):
        if _matches(key, ignored):
            continue
        if key not in old or key not in new:
            # a field one version of the package has and the other not (its default then
            # applies); but a TransformerConfig key the user set or dropped is a change
            if not key.startswith("model.transformer."):
                continue
        a, b = old.get(key), new.get(key)
        if a != b:
            changes.append((key, a, b))
    return changes


def check_resume(saved: Dict[str, Any], current: Dict[str, Any],
                 allowed: Sequence[str]) -> List[Change]:
    """Raises ValueError naming each refused change; returns the accepted ones.

    Args:
        saved, current: ``to_dict`` of the checkpoint's and this run's config, each with a
            ``data.content`` entry (the data's content hash) where known.
        allowed: train.resume_allow_changes.
    """
    changes = config_changes(saved, current)
    refused = [c for c in changes if _matches(c[0], REFUSED) and not _matches(c[0], allowed)]
    if refused:
        listed = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in refused)
        raise ValueError(
            f"resuming would change the optimisation: {listed}. Undo the change, start a new "
            "run (another train.output_dir), or list the keys in train.resume_allow_changes "
            f"(e.g. [{', '.join(k for k, _, _ in refused)}])")
    return changes
