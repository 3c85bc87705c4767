"""The run configuration: one YAML file with dotted command-line overrides.

Sections: model, parallel, loss, data, reference, optimizer, train. Every section is a
dataclass validated in ``__post_init__``; ``RunConfig.check_world`` checks the layout
against the world size. Both run before any model is built, and every error names the full
config key and the numbers involved.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import importlib.util
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence

import torch
import yaml

from adadpo_megatron.data.packing import PACKING_MODES
from adadpo_megatron.data.preference_data import DataSettings
from adadpo_megatron.mcore.lora import LoRAConfig
from adadpo_megatron.mcore.model_config import (
    MODEL_EXTRA_KEYS,
    MODEL_PRESETS,
    ModelConfig,
    ParallelConfig,
)
from adadpo_megatron.ops.loss_config import LossConfig
from adadpo_megatron.training.layout import ParallelLayout
from adadpo_megatron.validation import (
    from_mapping,
    require_choice,
    require_int,
    require_like_defaults,
    require_number,
)

# Every key that names a file or directory, and the one rule for a relative one.
PATH_KEYS = ("model.hf", "model.load", "data.path", "data.eval_path", "data.tokenizer",
             "reference.load", "reference.cache_path", "train.output_dir")
PATHS_RULE = ("relative paths (" + ", ".join(PATH_KEYS) + ") are relative to the working "
              "directory the command starts in, not to the config file, as in Megatron-LM, "
              "TRL and NeMo")


@dataclass
class DataConfig:
    """The preference data (see adadpo_megatron/data/preference_data.py for layouts and policies).

    Fields:
        path: a .json, .jsonl, .parquet or .arrow file, a directory (save_to_disk output or
            data files), or the name of a dataset in the local Hugging Face cache (PATHS_RULE
            says where a relative path starts).
        split: the split of a directory or named dataset.
        format: "auto", "explicit" (prompt/chosen/rejected strings), "implicit" (chosen and
            rejected whole texts, the prompt their shared beginning, as TRL), "conversational"
            (message lists, rendered with the tokenizer's chat template) or "pretokenized"
            (prompt_input_ids/chosen_input_ids/rejected_input_ids).
        tokenizer: "byte" (built in) or the path of a local Hugging Face tokenizer directory.
        seq_length: every sequence (prompt + response) is padded or truncated to this
            (TRL's max_length, whose default 1024 it shares).
        max_prompt_length: the longest prompt in tokens (BOS included); None means 512 (TRL's
            former default), at most seq_length // 2 so that a response always has room.
        prompt_truncation: "left" keeps BOS and the last tokens of a longer prompt (TRL's
            keep_end: the turns nearest the response stay); "drop" drops (and counts) its
            pair. Responses are cut at their end to fit; the start-up report counts both
            cuts and warns when most pairs were cut.
        skip_invalid: skip (and count) bad rows instead of stopping with an error.
        cache: keep the tokenised data in $ADADPO_CACHE_DIR (default
            ~/.cache/adadpo_megatron/tokenized), so a restart does not re-tokenise.
        eval_fraction: share of the pairs held out for evaluation, in [0, 0.5]; the split
            is a seeded random one.
        eval_path: instead of eval_fraction, an evaluation set of its own (a file,
            directory or cached dataset name, as path takes; every pair of it is evaluated,
            and path's pairs all train).
        eval_split: the split of eval_path; None means data.split.
        eval_seed: seeds the held-out split; None means train.seed. Fix it to vary
            train.seed (the data order) while holding out the same pairs, e.g. over the
            seeds of a sweep, or so that a warm-up stage never trains on them.
        packing: how sequences become micro-batches (adadpo_megatron/data/packing.py):
            "pack" (default) packs whole pairs into rows of seq_length tokens, so a step
            computes real tokens rather than padding; "longest" pads each micro-batch to its
            longest row only; "none" pads every sequence to seq_length. The gradient is the
            same in all three (tested); only the time and memory differ.
        max_tokens_per_micro_batch: with packing "pack", the tokens one packed micro-batch
            may compute (its rows times their length; one THD sequence on GPU), at least
            2 x seq_length (seq_length for train.stage sft) so that any pair fits. None means
            2 x train.micro_batch_size x seq_length, what a padded micro-batch computes. It
            sizes the micro-batch for memory, as NeMo-RL's dynamic batching and verl's
            max token length do: a step makes as few micro-batches as its pairs need.
    """

    path: str = ""
    split: str = "train"
    format: str = "auto"
    tokenizer: str = "byte"
    seq_length: int = 1024
    max_prompt_length: Optional[int] = None
    prompt_truncation: str = "left"
    skip_invalid: bool = False
    cache: bool = True
    eval_fraction: float = 0.0
    eval_path: Optional[str] = None
    eval_split: Optional[str] = None
    eval_seed: Optional[int] = None
    packing: str = "pack"
    max_tokens_per_micro_batch: Optional[int] = None

    def __post_init__(self):

        require_choice("data.packing", self.packing, PACKING_MODES)
        if self.max_tokens_per_micro_batch is not None:
            require_int("data.max_tokens_per_micro_batch", self.max_tokens_per_micro_batch)
            if self.packing != "pack":
                raise ValueError(f"data.max_tokens_per_micro_batch="
                                 f"{self.max_tokens_per_micro_batch} sizes packed micro-batches; "
                                 f"with data.packing={self.packing!r} train.micro_batch_size "
                                 "does: remove it or set data.packing=pack")

        if not self.path:
            raise ValueError("data.path is required: a preference data file, directory or "
                             "cached dataset name")
        require_int("data.seq_length", self.seq_length, low=4)
        if self.max_prompt_length is None:
            self.max_prompt_length = min(512, self.seq_length // 2)
        require_number("data.eval_fraction", self.eval_fraction, low=0.0, high=0.5)
        if self.eval_path is not None and self.eval_fraction:
            raise ValueError(f"data.eval_path={self.eval_path!r} and data.eval_fraction="
                             f"{self.eval_fraction} are both set: the evaluation pairs come "
                             "from one of them")
        if self.eval_split is not None and self.eval_path is None:
            raise ValueError(f"data.eval_split={self.eval_split!r} is the split of "
                             "data.eval_path, which is not set")
        if self.eval_seed is not None:
            require_int("data.eval_seed", self.eval_seed, low=0)
        if not 1 <= self.max_prompt_length < self.seq_length:
            raise ValueError(f"data.max_prompt_length={self.max_prompt_length!r} must be in "
                             f"[1, data.seq_length={self.seq_length})")
        for key in ("skip_invalid", "cache"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"data.{key}={getattr(self, key)!r} must be true or false")
        self.settings()  # format and prompt_truncation: checked where they are used

    def settings(self):
        """The DataSettings (the fields tokenising reads) of this section."""

        return DataSettings(**{f.name: getattr(self, f.name)
                               for f in dataclasses.fields(DataSettings)})


# Transformer Engine's context-parallel attention takes THD (packed) batches with these
# cp_comm_types from this release on (all_gather: TE PR 2829; before it asserts)
THD_CP_COMM_TYPES = {"p2p": "0", "a2a": "0", "all_gather": "2.18", "a2a+p2p": "2.18"}


def check_cp_comm_type(comm: Optional[str], packing: str, cp: int,
                       te_version: Optional[str]) -> None:
    """Raises ValueError naming model.cp_comm_type and data.packing where Transformer
    Engine ``te_version`` (None: not installed) cannot run that CP exchange on packed (THD)
    micro-batches."""
    comm = comm or "p2p"
    if cp == 1 or packing != "pack" or te_version is None:
        return
    if comm not in THD_CP_COMM_TYPES:
        raise ValueError(f"model.cp_comm_type={comm!r} is not one of "
                         f"{', '.join(THD_CP_COMM_TYPES)}")
    needed = THD_CP_COMM_TYPES[comm]
    if _release(te_version) < _release(needed):
        raise ValueError(f"model.cp_comm_type={comm!r} with data.packing=pack (THD) needs "
                         f"Transformer Engine >= {needed}, and this one is {te_version}: use "
                         "p2p or a2a, or data.packing longest")


def _release(version: str) -> tuple:
    """(major, minor) of a version string such as "2.18.0.dev0+abc"."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def _installed_version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# Token alignment FP8 GEMMs need, by recipe (MXFP8 scales blocks of 32 along the tokens).
FP8_SEQUENCE_MULTIPLE = {"delayed": 16, "tensorwise": 16, "blockwise": 16, "mxfp8": 32}

REFERENCE_MODES = ("precompute", "resident", "adapters_off", "none")


@dataclass
class ReferenceConfig:
    """Where the reference log-probs come from.

    Fields:
        mode: "precompute" (read a cache written by adadpo-precompute-reference), "resident"
            (a frozen copy of the initial policy runs forward-only in each step),
            "adapters_off" (with model.lora: the policy itself with its adapters switched off,
            which is the base, runs forward-only; no second copy of the weights) or "none"
            (reference-free losses: simpo, cpo, orpo). Unset: adapters_off with model.lora,
            else resident.
        cache_path: the precompute cache; None means next to the data file, as
            ``<data>.reference.pt``.
        load: a megatron-core distributed checkpoint for the reference's weights; None
            means the policy's initial weights (model.load, or the initialisation).
    """

    mode: Optional[str] = None
    cache_path: Optional[str] = None
    load: Optional[str] = None

    def __post_init__(self):
        if self.mode is not None:
            require_choice("reference.mode", self.mode, REFERENCE_MODES)


LR_DECAY_STYLES = ("constant", "linear", "cosine")


@dataclass
class OptimizerSection:
    """megatron-core's optimizer and learning-rate schedule.

    Fields:
        megatron: megatron-core OptimizerConfig fields (optimizer, lr, min_lr, weight_decay,
            adam_beta1, adam_beta2, adam_eps, clip_grad, use_distributed_optimizer, ...),
            DEFAULTS filled in where unset. use_distributed_optimizer defaults to true on GPU;
            it is refused on CPU.
        lr_warmup_fraction: share of train.max_steps spent in linear warm-up, in [0, 1).
        lr_decay_style: "constant", "linear" or "cosine", from the end of warm-up to
            train.max_steps, down to min_lr.
    """

    # this project's defaults where megatron-core's differ or it has none (its lr is None)
    DEFAULTS: ClassVar[Dict[str, Any]] = {"optimizer": "adam", "lr": 1e-5, "min_lr": 0.0,
                                          "weight_decay": 0.0, "clip_grad": 1.0}
    # the config keys ``scheduler`` reads: what the learning-rate and weight-decay schedule is
    SCHEDULE_KEYS: ClassVar[tuple] = ("train.max_steps", "optimizer.lr", "optimizer.min_lr",
                                      "optimizer.weight_decay", "optimizer.lr_warmup_fraction",
                                      "optimizer.lr_decay_style")

    megatron: Dict[str, Any] = field(default_factory=dict)
    lr_warmup_fraction: float = 0.0
    lr_decay_style: str = "constant"

    @classmethod
    def from_section(cls, section: Optional[Dict[str, Any]]) -> OptimizerSection:
        from megatron.core.optimizer import OptimizerConfig

        section = dict(section or {})
        ours = {k: section.pop(k) for k in ("lr_warmup_fraction", "lr_decay_style")
                if k in section}
        known = {f.name for f in dataclasses.fields(OptimizerConfig)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join('optimizer.' + k for k in unknown)}: "
                             "neither a megatron-core OptimizerConfig field nor "
                             "optimizer.lr_warmup_fraction / optimizer.lr_decay_style")
        require_like_defaults(OptimizerConfig, section, "optimizer")
        return cls(megatron=section, **ours)

    def __post_init__(self):
        self.megatron = {**self.DEFAULTS, **self.megatron}
        if not 0.0 <= self.lr_warmup_fraction < 1.0:
            raise ValueError(f"optimizer.lr_warmup_fraction={self.lr_warmup_fraction!r} must "
                             "be in [0, 1)")
        require_choice("optimizer.lr_decay_style", self.lr_decay_style, LR_DECAY_STYLES)
        m = self.megatron
        require_number("optimizer.lr", m["lr"], low=0.0, low_open=True)
        for key, low, high, high_open in (("min_lr", 0.0, None, False),
                                          ("weight_decay", 0.0, None, False),
                                          ("adam_beta1", 0.0, 1.0, True),
                                          ("adam_beta2", 0.0, 1.0, True),
                                          ("adam_eps", 0.0, None, False),
                                          ("sgd_momentum", 0.0, 1.0, True),
                                          ("clip_grad", 0.0, None, False)):
            if m.get(key) is not None:
                require_number(f"optimizer.{key}", m[key], low=low, high=high,
                               high_open=high_open)
        if m["min_lr"] > m["lr"]:
            raise ValueError(f"optimizer.min_lr={m['min_lr']!r} is above optimizer.lr="
                             f"{m['lr']!r}")

    def distributed(self, gpu: bool) -> bool:
        """use_distributed_optimizer: as set, else on GPU."""
        return bool(self.megatron.get("use_distributed_optimizer", gpu))

    def optimizer_config(self, *, gpu: bool, dtype):
        """megatron-core's OptimizerConfig of this section for parameters of ``dtype``."""
        from megatron.core.optimizer import OptimizerConfig  # megatron-core: imported on use

        return OptimizerConfig(**{**self.megatron, "use_distributed_optimizer":
                                  self.distributed(gpu), "bf16": dtype == torch.bfloat16,
                                  "params_dtype": dtype})

    def scheduler(self, optimizer, max_steps: int):
        """megatron-core's OptimizerParamScheduler of this section over ``max_steps``. On
        resume it keeps these settings and takes only the step count from the checkpoint
        (Megatron-LM's --override-opt_param-scheduler), so that a changed train.max_steps or
        an allowed optimizer change applies from the resumed step on."""
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        m = self.megatron
        warmup = int(self.lr_warmup_fraction * max_steps)
        return OptimizerParamScheduler(
            optimizer, init_lr=0.0 if warmup else m["lr"], max_lr=m["lr"], min_lr=m["min_lr"],
            lr_warmup_steps=warmup, lr_decay_steps=max(max_steps, warmup + 1),
            lr_decay_style=self.lr_decay_style, start_wd=m["weight_decay"],
            end_wd=m["weight_decay"], wd_incr_steps=max_steps, wd_incr_style="constant",
            override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False)


@dataclass
class TrainConfig:
    """The loop.

    Fields:
        global_batch_size: preference pairs per optimizer step, over all data-parallel ranks.
        micro_batch_size: pairs per micro-batch (each holds 2x this many sequences).
        max_steps: optimizer steps; None (with num_epochs unset too) means 10.
        num_epochs: instead of max_steps, passes over the training pairs (those kept after
            filtering, less the held-out ones), > 0, fractions allowed, as TRL's
            num_train_epochs: max_steps becomes ceil(num_epochs x pairs / global_batch_size),
            said at start.
        seed: seeds model initialisation and data order.
        output_dir: where metrics.jsonl, config.yaml and checkpoints/ go (PATHS_RULE).
        dtype: "float32" or "bfloat16" parameters and compute.
        save_interval: save a checkpoint every this many steps (and always after the last);
            0 saves only after the last step.
        keep_checkpoints: how many checkpoints to keep, >= 1.
        resume: "auto" (continue from output_dir/checkpoints/latest, or the newest verified
            step directory when the pointer is lost, when there is one), "never", or the
            checkpoint to continue from: a checkpoint, a run directory or its checkpoints/, a
            Megatron-LM root (as model.load takes them).
        eval_interval: evaluate on the held-out pairs every this many steps (and after the
            last); 0 never evaluates. Needs data.eval_fraction > 0.
        progress: show a progress bar (step, loss, accuracy, tokens/s, ETA) on the logging
            rank.
        tensorboard: write TensorBoard logs to output_dir/tensorboard.
        stage: "preference" (the configured loss) or "sft" (supervised warm-up: the mean NLL
            of the chosen responses; needs reference.mode none).
        exit_after_minutes: a wall-time budget, > 0, or None: once it has run out, every rank
            finishes the step, saves a checkpoint and the run exits with code 75, as on
            SIGTERM (docs/TRAINING.md, "Running for days").
        overwrite: with resume "never", allow a run into an output_dir that holds
            checkpoints: they and metrics.jsonl are removed first. Without it such a run is
            refused.
        resume_allow_changes: config keys ("loss.beta") or sections ("loss") that may differ
            from the checkpoint's config on resume; other changes that alter the
            optimisation are refused.
        distributed_timeout_minutes: how long any collective may wait for a rank, > 0, for
            the default group and every group megatron-core creates; a hung rank ends the job
            after it.
        grad_norm_warning_steps: warn when the gradient norm is 0 or not finite for this many
            consecutive steps, >= 1.
        wandb: log to Weights & Biases too: {project (required), name (default: the
            output_dir's name), entity, group, tags, mode: online | offline | disabled}; the
            effective config is the W&B run's config, and a resumed run continues the same
            W&B run. None (the default) logs to metrics.jsonl and TensorBoard only.
    """

    global_batch_size: int = 8
    micro_batch_size: int = 1
    max_steps: Optional[int] = None
    num_epochs: Optional[float] = None
    seed: int = 1234
    output_dir: str = "runs/adadpo"
    dtype: str = "float32"
    save_interval: int = 0
    keep_checkpoints: int = 2
    resume: str = "auto"
    eval_interval: int = 0
    progress: bool = True
    tensorboard: bool = True
    stage: str = "preference"
    exit_after_minutes: Optional[float] = None
    overwrite: bool = False
    resume_allow_changes: List[str] = field(default_factory=list)
    distributed_timeout_minutes: float = 30.0
    grad_norm_warning_steps: int = 3
    wandb: Optional[Dict[str, Any]] = None

    @property
    def logs_to_wandb(self) -> bool:
        """train.wandb is set and its mode is not disabled."""
        return bool(self.wandb) and self.wandb.get("mode", "online") != "disabled"

    def steps_for_epochs(self, train_pairs: int) -> int:
        """The optimizer steps of num_epochs passes over ``train_pairs`` pairs."""
        # exact: 1.1 epochs of 800 pairs at 8 a step is 110 steps, not float's 111
        pairs = Fraction(str(self.num_epochs)) * train_pairs
        return max(1, math.ceil(pairs / self.global_batch_size))

    @property
    def sides(self) -> int:
        """Sequences per pair in a micro-batch: 2 (chosen and rejected), 1 for SFT."""
        return 1 if self.stage == "sft" else 2

    def __post_init__(self):
        if self.wandb is not None:
            _check_wandb(self.wandb)
        if self.num_epochs is not None:
            if self.max_steps is not None:
                raise ValueError(f"train.max_steps={self.max_steps} and train.num_epochs="
                                 f"{self.num_epochs} are both set; set one (the other is "
                                 "derived from it: add train.max_steps=null to train by "
                                 "epochs)")
            require_number("train.num_epochs", self.num_epochs, low=0.0, low_open=True)
        elif self.max_steps is None:
            self.max_steps = 10
        for key in ("global_batch_size", "micro_batch_size", "keep_checkpoints"):
            require_int(f"train.{key}", getattr(self, key))
        if self.max_steps is not None:
            require_int("train.max_steps", self.max_steps)
        require_int("train.save_interval", self.save_interval, low=0)
        require_int("train.eval_interval", self.eval_interval, low=0)
        require_choice("train.dtype", self.dtype, ("float32", "bfloat16"))
        require_choice("train.stage", self.stage, ("preference", "sft"))
        if not isinstance(self.resume, str) or not self.resume:
            raise ValueError(f"train.resume={self.resume!r} must be 'auto', 'never' or the "
                             "path of a checkpoint directory")
        for key in ("progress", "tensorboard", "overwrite"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"train.{key}={getattr(self, key)!r} must be true or false")
        if self.exit_after_minutes is not None:
            require_number("train.exit_after_minutes", self.exit_after_minutes, low=0.0,
                           low_open=True)
        require_number("train.distributed_timeout_minutes", self.distributed_timeout_minutes,
                       low=0.0, low_open=True)
        require_int("train.grad_norm_warning_steps", self.grad_norm_warning_steps)
        if not isinstance(self.resume_allow_changes, list) or not all(
                isinstance(k, str) and k for k in self.resume_allow_changes):
            raise ValueError(f"train.resume_allow_changes={self.resume_allow_changes!r} must "
                             "be a list of config keys or sections, e.g. [loss.beta, data]")


WANDB_KEYS = ("project", "name", "entity", "group", "tags", "mode")


def _check_wandb(settings) -> None:
    if not isinstance(settings, dict) or not isinstance(settings.get("project"), str):
        raise ValueError(f"train.wandb={settings!r} must be a mapping with at least a project, "
                         "e.g. {project: adadpo, mode: offline}")
    unknown = sorted(set(settings) - set(WANDB_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) train.wandb.{', train.wandb.'.join(unknown)}; the "
                         f"keys are {', '.join(WANDB_KEYS)}")
    require_choice("train.wandb.mode", settings.get("mode", "online"),
                   ("online", "offline", "disabled"))
    for key in ("name", "entity", "group"):
        if settings.get(key) is not None and not isinstance(settings[key], str):
            raise ValueError(f"train.wandb.{key}={settings[key]!r} must be a string")
    tags = settings.get("tags")
    if tags is not None and (not isinstance(tags, list)
                             or not all(isinstance(t, str) for t in tags)):
        raise ValueError(f"train.wandb.tags={tags!r} must be a list of strings")


SECTIONS = ("model", "parallel", "loss", "data", "reference", "optimizer", "train")
# the containers whose keys the YAML writes one level up (to_dict nests them): the YAML's
# model.num_layers is model.transformer.num_layers, optimizer.lr is optimizer.megatron.lr
NESTED = {"model": "transformer", "optimizer": "megatron"}


@dataclass
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig
    loss: LossConfig
    data: DataConfig
    reference: ReferenceConfig
    optimizer: OptimizerSection
    train: TrainConfig
    source: Optional[str] = None

    @classmethod
    def from_dict(cls, raw: Dict[str, Any], source: Optional[str] = None) -> RunConfig:
        raw = dict(raw or {})
        unknown = sorted(set(raw) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown section(s) {', '.join(unknown)}; the sections are "
                             f"{', '.join(SECTIONS)}")
        for name in SECTIONS:
            if raw.get(name) is not None and not isinstance(raw[name], dict):
                raise ValueError(f"section {name} must be a mapping, got {raw[name]!r}")
        hf = (raw.get("model") or {}).get("hf")
        if hf and "tokenizer" not in (raw.get("data") or {}):
            # the model's own tokenizer (and chat template), unless the user names another
            raw["data"] = {**(raw.get("data") or {}), "tokenizer": hf}
        config = cls(
            model=ModelConfig.from_section(raw.get("model")),
            parallel=from_mapping(ParallelConfig, raw.get("parallel"), "parallel"),
            loss=from_mapping(LossConfig, raw.get("loss"), "loss"),
            data=from_mapping(DataConfig, raw.get("data"), "data"),
            reference=from_mapping(ReferenceConfig, raw.get("reference"), "reference"),
            optimizer=OptimizerSection.from_section(raw.get("optimizer")),
            train=from_mapping(TrainConfig, raw.get("train"), "train"),
            source=source,
        )
        if config.reference.mode is None:
            config.reference.mode = "adapters_off" if config.model.lora else "resident"
        config._check_consistency()
        return config

    def _check_consistency(self) -> None:
        _check_allowed_changes(self.train.resume_allow_changes)
        if self.data.eval_path is not None and \
                (self.eval_source(), self.data.eval_split or self.data.split) == \
                (self.data_source(), self.data.split):
            raise ValueError(f"data.eval_path={self.data.eval_path!r} with data.eval_split="
                             f"{self.data.eval_split!r} is the training data itself "
                             f"(data.path, split {self.data.split!r}): name another split "
                             "(data.eval_split) or file")
        if self.train.eval_interval and not self.evaluates:
            raise ValueError(f"train.eval_interval={self.train.eval_interval} needs "
                             "data.eval_fraction > 0 or data.eval_path (no pairs to evaluate "
                             "on)")
        if self.train.stage == "sft":
            if self.reference.mode != "none":
                raise ValueError("train.stage=sft trains on the chosen responses alone; set "
                                 f"reference.mode=none (got {self.reference.mode!r})")
        elif self.loss.needs_reference and self.reference.mode == "none":
            raise ValueError(f"loss.loss_type={self.loss.loss_type!r} needs a reference; set "
                             "reference.mode to precompute or resident (or adapters_off "
                             "with model.lora)")
        elif not self.loss.needs_reference and self.reference.mode != "none":
            raise ValueError(f"loss.loss_type={self.loss.loss_type!r} is reference-free; set "
                             f"reference.mode=none (got {self.reference.mode!r})")
        if self.reference.mode == "adapters_off":
            if self.model.lora is None:
                raise ValueError("reference.mode=adapters_off is the policy with its LoRA "
                                 "adapters switched off: it needs model.lora")
            if self.reference.load:
                raise ValueError("reference.mode=adapters_off uses the base the adapters "
                                 "adapt as the reference; reference.load needs "
                                 "reference.mode=resident or precompute")
        if self.train.stage != "sft":  # as PreferenceForwardStep checks, but before building
            self.loss.check_fused_logprobs(self.model.fused_logprobs)
        t, p = self.model.transformer, self.parallel
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        if t["num_attention_heads"] % tp:
            raise ValueError(f"model.num_attention_heads({t['num_attention_heads']}) is not "
                             f"divisible by parallel.tensor_model_parallel_size({tp})")
        groups = t.get("num_query_groups") or t["num_attention_heads"]
        if groups % tp:
            raise ValueError(f"model.num_query_groups({groups}) is not divisible by "
                             f"parallel.tensor_model_parallel_size({tp})")
        stages = pp * (p.virtual_pipeline_model_parallel_size or 1)
        if t["num_layers"] % stages:
            raise ValueError(f"model.num_layers({t['num_layers']}) is not divisible by "
                             f"parallel.pipeline_model_parallel_size({pp}) * "
                             "parallel.virtual_pipeline_model_parallel_size"
                             f"({p.virtual_pipeline_model_parallel_size or 1})")
        fp8 = t.get("fp8")
        if fp8:
            if self.train.dtype != "bfloat16":
                raise ValueError(f"model.fp8={fp8!r} needs train.dtype=bfloat16 (got "
                                 f"{self.train.dtype!r}): FP8 GEMMs run inside a bf16 model")
            recipe = t.get("fp8_recipe", "delayed")
            multiple = FP8_SEQUENCE_MULTIPLE.get(recipe, 16)
            if self.data.seq_length % multiple:
                raise ValueError(f"data.seq_length({self.data.seq_length}) must be a multiple "
                                 f"of {multiple} for model.fp8_recipe={recipe!r}: sequences are "
                                 "padded to seq_length, and FP8 GEMMs need that alignment")
        if p.sequence_parallel and self.data.seq_length % tp:
            raise ValueError(f"data.seq_length({self.data.seq_length}) is not divisible by "
                             f"parallel.tensor_model_parallel_size({tp}), which sequence "
                             "parallelism splits it over")
        cp = p.context_parallel_size
        if cp > 1 and self.data.seq_length % (2 * cp):
            raise ValueError(f"data.seq_length({self.data.seq_length}) is not divisible by "
                             f"2 * parallel.context_parallel_size({cp})")
        ep, experts = p.expert_model_parallel_size, t.get("num_moe_experts")
        if ep > 1 and not experts:
            raise ValueError(f"parallel.expert_model_parallel_size={ep} on a dense model: "
                             "expert parallelism needs model.num_moe_experts (or a model.hf "
                             "with experts)")
        if experts and experts % ep:
            raise ValueError(f"model.num_moe_experts({experts}) is not divisible by "
                             f"parallel.expert_model_parallel_size({ep})")
        budget, sides = self.data.max_tokens_per_micro_batch, self.train.sides
        if budget is not None and budget < sides * self.data.seq_length:
            raise ValueError(f"data.max_tokens_per_micro_batch({budget}) is below "
                             f"{sides} x data.seq_length({self.data.seq_length}): a pair of "
                             "that length would fit no micro-batch")
        if budget is not None and cp > 1 and budget % (2 * cp):
            raise ValueError(f"data.max_tokens_per_micro_batch({budget}) is not divisible by "
                             f"2 * parallel.context_parallel_size({cp}): every packed "
                             "micro-batch is cut in 2 x CP equal chunks")

    @property
    def fp8_multiple(self) -> int:
        """The token alignment the FP8 GEMMs need (1 without FP8)."""
        t = self.model.transformer
        return FP8_SEQUENCE_MULTIPLE.get(t.get("fp8_recipe", "delayed"), 16) if t.get("fp8") else 1

    def micro_batch_tokens(self) -> int:
        """data.max_tokens_per_micro_batch, else what a padded micro-batch computes."""
        return (self.data.max_tokens_per_micro_batch
                or self.train.sides * self.train.micro_batch_size * self.data.seq_length)

    def check_machine(self, *, gpu: bool) -> None:
        """What this machine must have for the config, beyond the layout's needs
        (ParallelLayout.check_machine): FP8 needs a GPU with Transformer Engine; the CPU
        runs float32 without the distributed optimizer."""
        fp8 = self.model.transformer.get("fp8")
        if fp8:
            if not gpu:
                raise ValueError(f"model.fp8={fp8!r} needs a GPU with Transformer Engine; "
                                 "remove model.fp8 to run on CPU")
            if importlib.util.find_spec("transformer_engine") is None:
                raise ValueError(f"model.fp8={fp8!r} needs Transformer Engine: "
                                 "pip install -e '.[te]'")
        if self.train.logs_to_wandb and importlib.util.find_spec("wandb") is None:
            raise ValueError("train.wandb needs the wandb package: pip install -e '.[wandb]' "
                             "(or remove train.wandb, or set train.wandb.mode=disabled)")
        if gpu:
            check_cp_comm_type(self.model.transformer.get("cp_comm_type"), self.data.packing,
                               self.parallel.context_parallel_size,
                               _installed_version("transformer_engine"))
            return
        if self.optimizer.megatron.get("use_distributed_optimizer"):
            raise ValueError("optimizer.use_distributed_optimizer=true needs a GPU; on CPU "
                             "megatron-core's plain optimizer is used")
        if self.train.dtype != "float32":
            raise ValueError(f"train.dtype={self.train.dtype!r}: CPU runs use float32")

    def check_world(self, world_size: int, *, gpu: bool) -> ParallelLayout:
        """The parallel layout on ``world_size`` processes, checked against the world, the
        batch sizes and the machine."""
        layout = ParallelLayout.of(self, world_size)
        layout.check_machine(gpu=gpu)
        self.check_machine(gpu=gpu)
        return layout

    def resolve(self, path) -> Optional[Path]:
        """A path of the config (any key that names a file or directory) made absolute: a
        relative path is relative to the working directory the command starts in, as
        Megatron-LM's, TRL's and NeMo's paths are (PATHS_RULE)."""
        if path is None:
            return None
        return Path(path).absolute()

    @property
    def eval_seed(self) -> int:
        """The seed of the held-out split: data.eval_seed, else train.seed."""
        return self.train.seed if self.data.eval_seed is None else self.data.eval_seed

    def data_source(self) -> str:
        """data.path as a file or directory (PATHS_RULE), else as a dataset name."""
        return self._source(self.data.path)

    def eval_source(self) -> Optional[str]:
        """data.eval_path as data_source reads data.path (None without it)."""
        return None if self.data.eval_path is None else self._source(self.data.eval_path)

    def _source(self, path: str) -> str:
        resolved = self.resolve(path)
        if resolved.exists() or Path(path).is_absolute():
            return str(resolved)
        return path

    @property
    def evaluates(self) -> bool:
        """Whether the run has pairs to evaluate on (data.eval_fraction or data.eval_path)."""
        return bool(self.data.eval_fraction) or self.data.eval_path is not None

    def tokenizer_spec(self) -> str:
        if self.data.tokenizer == "byte":
            return "byte"
        return str(self.resolve(self.data.tokenizer))


class _Loader(yaml.SafeLoader):
    """YAML 1.1 with YAML 1.2's floats: ``1e-3`` is a number, not the string '1e-3'."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _yaml(text):
    return yaml.load(text, Loader=_Loader)


def _parse_override(item: str):
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value")
    key, value = item.split("=", 1)
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"override {item!r}: the key must be section.key (e.g. train.seed=1)")
    return parts, _yaml(value)


def load_run_config(path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Reads ``path`` (YAML), applies ``section.key=value`` overrides, validates."""
    path_obj = Path(path)
    if not path_obj.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path_obj) as f:
        try:
            raw = _yaml(f) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        parts, value = _parse_override(item)
        node: Dict[str, Any] = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    try:
        return RunConfig.from_dict(raw, source=str(path_obj))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {err}") from err


def config_keys() -> List[str]:
    """Every key a run config may set, as its YAML names it ("optimizer.weight_decay",
    "model.num_layers", "model.lora.rank"), plus "data.content" (the data's content, which
    resuming compares)."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    def names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    sections = {
        "model": names(TransformerConfig) + list(MODEL_EXTRA_KEYS)
        + [f"lora.{k}" for k in names(LoRAConfig)],
        "parallel": names(ParallelConfig), "loss": names(LossConfig),
        "data": names(DataConfig) + ["content"], "reference": names(ReferenceConfig),
        "optimizer": names(OptimizerConfig) + ["lr_warmup_fraction", "lr_decay_style"],
        "train": names(TrainConfig)}
    return [f"{section}.{key}" for section, keys in sections.items() for key in keys]


def _check_allowed_changes(allowed: Sequence[str]) -> None:
    """train.resume_allow_changes names sections or config keys, as the YAML writes them."""
    known = None
    for key in allowed:
        if key in SECTIONS:
            continue
        known = known or config_keys()
        if key not in known and not any(k.startswith(key + ".") for k in known):
            flat = key
            for section, inner in NESTED.items():
                flat = flat.replace(f"{section}.{inner}.", f"{section}.")
            close = ([flat] if flat in known else  # a section before a key of one
                     difflib.get_close_matches(key, SECTIONS, n=1, cutoff=0.6)
                     or difflib.get_close_matches(key, known, n=1, cutoff=0.6))
            raise ValueError(f"train.resume_allow_changes: {key!r} is neither a section ("
                             f"{', '.join(SECTIONS)}) nor a config key"
                             f"{f'; did you mean {close[0]!r}' if close else ''}")


def to_dict(config: RunConfig) -> Dict[str, Any]:
    """A plain-data view of the config (for logs and fingerprints)."""
    out: Dict[str, Any] = {}
    for name in SECTIONS:
        out[name] = dataclasses.asdict(getattr(config, name))
    return out


__all__: List[str] = ["RunConfig", "load_run_config", "to_dict", "MODEL_PRESETS"]
