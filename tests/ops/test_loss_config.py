"""LossConfig validation: every bad value names the key, the value and the allowed range."""

import math

import pytest

from adadpo_megatron.ops.loss_config import LossConfig
from tests.support.training import REPO


def test_defaults_follow_the_paper():
    cfg = LossConfig()
    assert (cfg.loss_type, cfg.adaptive, cfg.clip, cfg.gradient_ratio) == ("dpo", True, 2.0, 1.0)
    assert (cfg.coefficient_reduction, cfg.coefficient_space) == ("mean", "policy")
    assert cfg.effective_nll_weight == 0.0
    assert LossConfig(loss_type="cpo").effective_nll_weight == 1.0
    assert LossConfig(loss_type="orpo").effective_nll_weight == 1.0
    assert LossConfig(loss_type="orpo", nll_weight=0.25).effective_nll_weight == 0.25
    assert LossConfig(clip=math.inf).clip == math.inf


def test_mixes_resolve_aliases_weights_and_reference():
    mpo = LossConfig(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    assert mpo.terms == (("dpo", 0.8), ("bco_pair", 0.2), ("sft", 1.0))
    assert mpo.primary_type == "dpo" and mpo.needs_reference
    assert mpo.effective_nll_weight == 0.0
    assert LossConfig(loss_type=["simpo", "sft"]).needs_reference is False
    assert LossConfig(loss_type=["sft"], adaptive=False).primary_type == "sft"
    assert LossConfig(loss_type=["dpo", "cpo"]).effective_nll_weight == 1.0


@pytest.mark.parametrize("field,value,message", [
    ("loss_type", "kto", r"loss\.loss_type='kto' is not allowed; choose one of 'dpo'"),
    ("beta", 0.0, r"loss\.beta=0\.0 is out of range; allowed: \(0\.0, inf\]"),
    ("beta", -1, r"loss\.beta=-1 is out of range"),
    ("beta", math.nan, r"loss\.beta=nan must be a finite number"),
    ("beta", "0.1", r"loss\.beta='0\.1' must be a number"),
    ("beta", True, r"loss\.beta=True must be a number"),
    ("clip", 0, r"loss\.clip=0 is out of range; allowed: \(0\.0, inf\]"),
    ("adaptive", "yes", r"loss\.adaptive='yes' must be true or false"),
    ("coefficient_space", "log", r"loss\.coefficient_space='log' is not allowed"),
    ("coefficient_reduction", "max", r"loss\.coefficient_reduction='max' is not allowed"),
    ("gradient_ratio", 0.0, r"loss\.gradient_ratio=0\.0 is out of range"),
    ("gradient_ratio", math.inf, r"loss\.gradient_ratio=inf must be a finite number"),
    ("label_smoothing", 0.5,
     r"loss\.label_smoothing=0\.5 is out of range; allowed: \[0\.0, 0\.5\)"),
    ("simpo_gamma", math.inf, r"loss\.simpo_gamma=inf must be a finite number"),
    ("rdpo_alpha", -0.1, r"loss\.rdpo_alpha=-0\.1 is out of range"),
    ("nll_weight", -1.0, r"loss\.nll_weight=-1\.0 is out of range"),
    ("orpo_lambda", -1.0, r"loss\.orpo_lambda=-1\.0 is out of range"),
    ("loss_type", [], r"loss\.loss_type=\[\] must be a loss type or a non-empty list"),
    ("loss_type", ["dpo", "kto"], r"loss\.loss_type='kto' is not allowed"),
    ("loss_type", ["sigmoid", "dpo"], r"names a loss twice"),
    ("nll_reduction", "sequence", r"loss\.nll_reduction='sequence' is not allowed"),
    ("discopop_tau", 0.0, r"loss\.discopop_tau=0\.0 is out of range"),
    ("ld_alpha", 1.5, r"loss\.ld_alpha=1\.5 is out of range; allowed: \[0\.0, 1\.0\]"),
    ("use_weighting", 1, r"loss\.use_weighting=1 must be true or false"),
    ("bco_running_mean", "no", r"loss\.bco_running_mean='no' must be true or false"),
])
def test_invalid_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**{field: value})


@pytest.mark.parametrize("kwargs,message", [
    ({"loss_type": "ipo", "label_smoothing": 0.1},
     r"label_smoothing=0\.1 does not apply to loss_type 'ipo'"),
    ({"loss_type": ["dpo", "hinge"], "label_smoothing": 0.1},
     r"does not apply to loss_type 'hinge'"),
    ({"loss_type": "exo_pair"}, r"'exo_pair' needs label_smoothing > 0"),
    ({"loss_type": "apo_down"}, r"adaptive=true is not defined for loss_type 'apo_down'"),
    ({"loss_type": ["dpo", "aot_unpaired"]},
     r"adaptive=true is not defined for loss_type 'aot_unpaired'"),
    ({"loss_type": "sft"}, r"adaptive=true needs a preference loss"),
    ({"loss_type": "aot", "use_weighting": True}, r"use_weighting=true is not defined for aot"),
    ({"loss_type": ["dpo", "sft"], "loss_weights": [1.0]},
     r"loss_weights=\[1\.0\] must be a list of 2 number"),
    ({"loss_type": ["dpo", "sft"], "loss_weights": [1.0, -1.0]},
     r"loss\.loss_weights\[1\]=-1\.0 is out of range"),
    ({"loss_type": "simpo", "coefficient_space": "ratio"}, r"'simpo' is reference-free"),
    ({"loss_type": "orpo", "coefficient_reduction": "sum"}, r"not defined for loss_type='orpo'"),
])
def test_invalid_combinations(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**kwargs)


def test_shipped_loss_presets_load():

    import yaml

    from adadpo_megatron.validation import from_mapping

    presets = sorted((REPO / "configs" / "loss").glob("*.yaml"))
    assert presets, "configs/loss/*.yaml missing"
    for path in presets:
        cfg = from_mapping(LossConfig, yaml.safe_load(path.read_text()), "loss")
        assert isinstance(cfg, LossConfig), path


def test_unknown_key_is_named():
    from adadpo_megatron.validation import from_mapping

    with pytest.raises(ValueError, match=r"unknown key loss\.betta; known keys of loss: "
                                         r"adaptive, bco_running_mean, beta"):
        from_mapping(LossConfig, {"betta": 0.1}, "loss")
