"""Resume honours a change or refuses it, never half-applies it (issue 23, items 1-3, 5, 6).

Real trainers on one gloo process; the oracles are a fresh run of the changed config (the
learning-rate schedule), AdamW's own update rule (weight decay), and the files on disk.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from adadpo_megatron.training.checkpointing.resume_checks import check_resume
from tests.support.distributed import run_distributed
from tests.support.training import tiny_config

ADAM = {"optimizer.optimizer": "adam", "optimizer.lr": 1e-3, "optimizer.min_lr": 0.0,
        "optimizer.weight_decay": 0.0, "optimizer.adam_beta1": 0.9,
        "optimizer.adam_beta2": 0.95, "optimizer.clip_grad": 1.0,
        "optimizer.lr_decay_style": "cosine", "optimizer.lr_warmup_fraction": 0.25,
        "train.progress": False, "train.tensorboard": False}


def _train(overrides):
    """(start step, metrics of each step run, the trainer's optimizer groups after setup)."""
    from adadpo_megatron.training.trainer import Trainer

    trainer = Trainer(tiny_config({**ADAM, **overrides}))
    try:
        trainer.setup()
        groups = [{k: v for k, v in g.items() if k != "params"}
                  for g in trainer.optimizer.param_groups]
        return trainer.start_step, trainer.train(), groups, trainer
    finally:
        trainer.close()


def _schedule_worker(rank, world, tmp, out):
    tmp = Path(tmp)
    _train({"train.output_dir": str(tmp / "run"), "train.max_steps": 4})
    start, resumed, _, _ = _train({"train.output_dir": str(tmp / "run"), "train.max_steps": 8})
    _, fresh, _, _ = _train({"train.output_dir": str(tmp / "fresh"), "train.max_steps": 8})
    torch.save({"start": start, "resumed": resumed, "fresh": fresh}, out)


@pytest.mark.slow
def test_raising_max_steps_follows_the_new_schedule(tmp_path):
    """Cosine to min_lr 0 (the 70B recipe's): with the old decay length every added step
    trained at learning rate 0. Oracle: a fresh 8-step run's rates from step 4 on."""
    out = tmp_path / "out.pt"
    run_distributed(_schedule_worker, 1, str(tmp_path), str(out))
    result = torch.load(out, weights_only=False)
    assert result["start"] == 4
    got = [m["learning_rate"] for m in result["resumed"]]
    want = [m["learning_rate"] for m in result["fresh"][4:]]
    assert got == pytest.approx(want, rel=1e-12)
    assert min(got) > 0, "a step at learning rate 0"


def _optimizer_worker(rank, world, tmp, out):
    from adadpo_megatron.mcore.parameter_names import global_parameter_names

    tmp = Path(tmp)
    first = {"train.output_dir": str(tmp / "run"), "train.max_steps": 2,
             "train.keep_checkpoints": 5}
    _train(first)
    changed = {"optimizer.lr": 2e-3, "optimizer.min_lr": 1e-4, "optimizer.weight_decay": 0.1,
               "optimizer.adam_beta1": 0.8, "optimizer.adam_beta2": 0.9,
               "optimizer.clip_grad": 0.5, "optimizer.lr_warmup_fraction": 0.5}
    allow = {"train.resume_allow_changes": ["optimizer"]}
    results = {}
    for name, overrides in (("changed", changed),
                            ("no_decay", {**changed, "optimizer.weight_decay": 0.0})):
        run = tmp / name
        shutil.copytree(tmp / "run", run)
        from adadpo_megatron.training.trainer import Trainer

        config = tiny_config({**ADAM, **overrides, **allow, "train.output_dir": str(run),
                              "train.max_steps": 4})
        trainer = Trainer(config)
        try:
            trainer.setup()
            before = {n: p.detach().clone()
                      for n, p in global_parameter_names(trainer.model[0].module)}
            after_setup = [{k: v for k, v in g.items() if k != "params"}
                           for g in trainer.optimizer.param_groups]
            step = trainer.train_step(2)
            after_step = [{k: v for k, v in g.items() if k != "params"}
                          for g in trainer.optimizer.param_groups]
            weights = {n: p.detach().clone()
                       for n, p in global_parameter_names(trainer.model[0].module)}
            results[name] = dict(before=before, after=weights, setup=after_setup,
                                 step_groups=after_step, step=step,
                                 clip=trainer.optimizer.config.clip_grad)
        finally:
            trainer.close()
    _, fresh, _, _ = _train({**changed, "train.output_dir": str(tmp / "fresh"),
                             "train.max_steps": 4})
    results["fresh"] = fresh
    torch.save(results, out)


@pytest.mark.slow
def test_allowed_optimizer_changes_take_effect(tmp_path):
    """optimizer.lr allowed used to crash in megatron-core's parameter-group lookup, and an
    allowed weight_decay was put back to the checkpoint's after one step."""
    out = tmp_path / "out.pt"
    run_distributed(_optimizer_worker, 1, str(tmp_path), str(out))
    r = torch.load(out, weights_only=False)
    changed, no_decay = r["changed"], r["no_decay"]
    for groups in (changed["setup"], changed["step_groups"]):
        for group in groups:
            assert group["max_lr"] == 2e-3 and group["min_lr"] == 1e-4
            assert group["betas"] == (0.8, 0.9)
            assert group["weight_decay"] == pytest.approx(0.1 * group.get("wd_mult", 1.0))
    assert changed["clip"] == 0.5
    # the schedule of a fresh run of the changed config, at the resumed step
    assert changed["step"]["learning_rate"] == pytest.approx(r["fresh"][2]["learning_rate"],
                                                             rel=1e-12)
    # AdamW decays decoupled from the gradient: the same step without decay differs by
    # exactly lr * wd * w on decayed weights (same weights, moments and batch)
    lr = changed["step"]["learning_rate"]
    decayed = 0
    for name, w0 in changed["before"].items():
        delta = changed["after"][name] - no_decay["after"][name]
        if torch.count_nonzero(delta):
            decayed += 1
            # each side is w0 * (1 - lr * wd) - update, rounded once per float32 operation:
            # a few units of float32 rounding of |w0| and of the update
            torch.testing.assert_close(delta, -lr * 0.1 * w0, rtol=0,
                                       atol=8 * 2**-24 * (w0.abs().max().item() + 1e-2))
    assert decayed > 0, "weight decay changed no weight"


def _refusal_worker(rank, world, tmp, out):
    from tests.support.hf_models import make_pairs, make_tokenizer

    tmp = Path(tmp)
    tokenizer = tmp / "tokenizer"
    make_tokenizer().save_pretrained(tokenizer)
    base = {"train.output_dir": str(tmp / "run"), "train.max_steps": 1,
            "data.tokenizer": str(tokenizer), "data.eval_fraction": 0.25,
            # token ids (below the tokenizer's 302), so that its files matter and its words not
            "data.path": make_pairs(tmp / "pairs.jsonl", pairs=32)}
    _train(base)

    def outcome(**overrides):
        try:
            _train({**base, "train.max_steps": 2, **overrides})
            return "ok"
        except ValueError as err:
            return str(err)

    results = {"eval_seed": outcome(**{"data.eval_seed": 5})}
    # the same tokenizer directory, its vocabulary changed in place
    spec = json.loads((tokenizer / "tokenizer.json").read_text())
    spec["model"]["vocab"]["t299"], spec["model"]["vocab"]["t298"] = 298, 299
    (tokenizer / "tokenizer.json").write_text(json.dumps(spec))
    results["tokenizer"] = outcome()
    results["tokenizer_allowed"] = outcome(
        **{"train.resume_allow_changes": ["data.tokenizer"]})
    torch.save(results, out)


@pytest.mark.slow
def test_resume_refuses_another_held_out_split_and_a_tokenizer_changed_in_place(tmp_path):
    out = tmp_path / "out.pt"
    run_distributed(_refusal_worker, 1, str(tmp_path), str(out))
    r = torch.load(out, weights_only=False)
    # eval_seed unset is train.seed (7): 5 holds out other pairs
    assert "data.eval_seed: 7 in the checkpoint, 5 now" in r["eval_seed"]
    assert "data.tokenizer: its files changed in place since the checkpoint" in r["tokenizer"]
    assert "train.resume_allow_changes (e.g. [data.tokenizer])" in r["tokenizer"]
    assert r["tokenizer_allowed"] == "ok"


def _weights_worker(rank, world, tmp, out):
    tmp = Path(tmp)
    # a run whose checkpoint is the next run's model.load (and its resident reference)
    _train({"train.output_dir": str(tmp / "base"), "train.max_steps": 1})
    base = tmp / "base" / "checkpoints" / "step_0000001"
    run = {"train.output_dir": str(tmp / "run"), "train.max_steps": 1,
           "model.load": str(base), "reference.mode": "resident"}
    _train(run)
    shard = next(base.glob("*.distcp"))
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten in place
    results = {}
    for name, extra in (("refused", {}),
                        ("allowed", {"train.resume_allow_changes": ["model.load"]})):
        try:
            _train({**run, "train.max_steps": 2, **extra})
            results[name] = "ok"
        except ValueError as err:
            results[name] = str(err)
    torch.save(results, out)


@pytest.mark.slow
def test_resume_refuses_reference_weights_replaced_in_place(tmp_path):
    """model.load's weights are the resident reference's: replaced in place (same path), they
    silently became another reference."""
    out = tmp_path / "out.pt"
    run_distributed(_weights_worker, 1, str(tmp_path), str(out))
    r = torch.load(out, weights_only=False)
    assert "model.load: its files changed in place since the checkpoint" in r["refused"]
    assert r["allowed"] == "ok"


def test_the_expert_parallel_size_cannot_change_on_resume_allowed_or_not():
    saved = {"parallel": {"expert_model_parallel_size": 1}}
    current = {"parallel": {"expert_model_parallel_size": 2}}
    for allowed in ([], ["parallel"], ["parallel.expert_model_parallel_size"]):
        with pytest.raises(ValueError, match=r"parallel.expert_model_parallel_size=2 \(the "
                                             r"checkpoint's is 1\) is not possible, whatever "
                                             r"train.resume_allow_changes says: the experts' "
                                             r"optimizer state"):
            check_resume(saved, current, allowed)


@pytest.mark.parametrize("saved,current,allowed,key", [
    # an architecture key, allowed: the checkpoint's tensors would not fit
    ({"model": {"transformer": {"num_layers": 4}}}, {"model": {"transformer": {"num_layers": 2}}},
     ["model"], "model.num_layers"),
    # LoRA added to a full-model run, and another rank
    ({"model": {"lora": None}}, {"model": {"lora": {"rank": 4}}}, ["model"], "model.lora.rank"),
    ({"model": {"lora": {"rank": 8}}}, {"model": {"lora": {"rank": 4}}}, ["model"],
     "model.lora.rank"),
    # another optimizer, and SGD's momentum switched on (no buffers in the checkpoint)
    ({"optimizer": {"megatron": {"optimizer": "adam"}}},
     {"optimizer": {"megatron": {"optimizer": "sgd"}}}, ["optimizer"], "optimizer.optimizer"),
    ({"optimizer": {"megatron": {"optimizer": "sgd", "sgd_momentum": 0.0}}},
     {"optimizer": {"megatron": {"optimizer": "sgd", "sgd_momentum": 0.9}}}, ["optimizer"],
     "optimizer.sgd_momentum"),
])
def test_changes_that_cannot_take_effect_are_refused_whatever_is_allowed(saved, current,
                                                                         allowed, key):
    """Issue 23 review: these passed the check (allowed) and then crashed minutes later in
    the checkpoint load, or blamed the checkpoint."""
    with pytest.raises(ValueError, match=rf"resuming with {key}=.* is not possible, whatever "
                                         r"train.resume_allow_changes says"):
        check_resume(saved, current, allowed)


def test_an_optimizer_key_set_in_one_run_only_is_a_change():
    """Issue 23 review: optimizer.adam_eps added on resume was neither refused nor printed,
    and took effect."""
    saved = {"optimizer": {"megatron": {"lr": 1e-3}}}
    current = {"optimizer": {"megatron": {"lr": 1e-3, "adam_eps": 0.5}}}
    with pytest.raises(ValueError, match=r"optimizer.adam_eps: None in the checkpoint, 0.5 now"):
        check_resume(saved, current, [])
    assert check_resume(saved, current, ["optimizer.adam_eps"]) == [
        ("optimizer.adam_eps", None, 0.5)]
    # a checkpoint from before the section filled in its defaults: no change
    assert check_resume({"optimizer": {"megatron": {}}},
                        {"optimizer": {"megatron": {"lr": 1e-5, "clip_grad": 1.0}}}, []) == []


def test_micro_batch_grouping_is_refused_where_the_loss_averages_over_its_tokens():
    """Issue 23 review: with loss.nll_reduction token the NLL term is a mean over each
    micro-batch's tokens, so the micro-batch size changes the gradient."""
    saved, current = ({"train": {"micro_batch_size": m}} for m in (4, 2))
    assert check_resume(saved, current, []) == [("train.micro_batch_size", 4, 2)]
    with pytest.raises(ValueError, match=r"train.micro_batch_size: 4 in the checkpoint, 2 now"):
        check_resume(saved, current, [], micro_batch_dependent=True)
    config = tiny_config({"loss.nll_weight": 1.0, "loss.nll_reduction": "token"})
    assert config.loss.token_mean_per_micro_batch
    assert not tiny_config({"loss.nll_weight": 1.0}).loss.token_mean_per_micro_batch


@pytest.mark.parametrize("key,hint", [
    ("optimizer.megatron.weight_decay", "did you mean 'optimizer.weight_decay'"),
    ("optimizer.wieght_decay", "did you mean 'optimizer.weight_decay'"),
    ("model.transformer.num_layers", "did you mean 'model.num_layers'"),
    ("trian", "did you mean 'train'"),  # a section, before train.wandb (also close)
    ("zzz", "")])
def test_unknown_allow_keys_are_refused_at_config_load(key, hint):
    with pytest.raises(ValueError, match=rf"train.resume_allow_changes: '{key}' is neither a "
                                         r"section .* nor a config key" + (f"; {hint}" if hint
                                                                            else "$")):
        tiny_config({"train.resume_allow_changes": [key]})
    for fine in ("optimizer", "optimizer.weight_decay", "model.lora", "model.num_layers",
                 "data.content", "loss.beta"):
        tiny_config({"train.resume_allow_changes": [fine]})


def _lost_pointer_worker(rank, world, tmp, out):
    tmp = Path(tmp)
    run = {"train.output_dir": str(tmp / "run"), "train.save_interval": 1,
           "train.keep_checkpoints": 5}
    _train({**run, "train.max_steps": 3})
    root = tmp / "run" / "checkpoints"
    (root / "latest").unlink()
    start, history, _, _ = _train({**run, "train.max_steps": 4})
    metrics = [json.loads(line)["step"]
               for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    # no pointer again, and the newest checkpoint damaged: refused, nothing written over
    (root / "latest").unlink()
    (root / "step_0000004" / "adadpo_state.pt").unlink()
    kept = sorted(p.name for p in root.iterdir())
    try:
        _train({**run, "train.max_steps": 6})
        refusal = "ok"
    except ValueError as err:
        refusal = str(err)
    torch.save({"start": start, "steps": [m["step"] for m in history], "metrics": metrics,
                "refusal": refusal, "kept": kept,
                "after": sorted(p.name for p in root.iterdir()),
                "metrics_after": len((tmp / "run" / "metrics.jsonl").read_text().splitlines())},
               out)


@pytest.mark.slow
def test_a_lost_latest_pointer_resumes_from_the_newest_verified_checkpoint(tmp_path):
    """Step directories but no checkpoints/latest used to start at step 0, write over the
    step directories and truncate metrics.jsonl."""
    out = tmp_path / "out.pt"
    run_distributed(_lost_pointer_worker, 1, str(tmp_path), str(out))
    r = torch.load(out, weights_only=False)
    assert r["start"] == 3 and r["steps"] == [3]
    assert r["metrics"] == [0, 1, 2, 3]
    assert "has no 'latest' pointer and its newest checkpoint step_0000004 is incomplete " \
           "(no adadpo_state.pt): restore it, or remove it to resume from step_0000003" \
           in r["refusal"]
    assert r["after"] == r["kept"] and r["metrics_after"] == 4, "the refused run wrote"


def _metrics_worker(rank, world, tmp, out):
    tmp = Path(tmp)
    run = {"train.output_dir": str(tmp / "run"), "train.save_interval": 1}
    _train({**run, "train.max_steps": 3})
    # the checkpoints moved away (to free space), the metrics left behind
    shutil.rmtree(tmp / "run" / "checkpoints")
    start, _, _, _ = _train({**run, "train.max_steps": 2})
    kept = (tmp / "run" / "metrics.jsonl.1").read_text().splitlines()
    now = (tmp / "run" / "metrics.jsonl").read_text().splitlines()
    # an empty latest pointer (a node crash before its write reached the disk)
    (tmp / "run" / "checkpoints" / "latest").write_text("")
    again, _, _, _ = _train({**run, "train.max_steps": 3})
    torch.save({"start": start, "kept": [json.loads(x)["step"] for x in kept],
                "now": [json.loads(x)["step"] for x in now], "again": again}, out)


@pytest.mark.slow
def test_metrics_are_never_written_over_and_an_empty_pointer_falls_back(tmp_path):
    """Issue 23 review: a start at step 0 over an earlier start's metrics (no checkpoint left
    to resume) truncated metrics.jsonl; an empty checkpoints/latest was reported as naming
    'checkpoints'."""
    out = tmp_path / "out.pt"
    run_distributed(_metrics_worker, 1, str(tmp_path), str(out))
    r = torch.load(out, weights_only=False)
    assert r["start"] == 0 and r["kept"] == [0, 1, 2] and r["now"] == [0, 1]
    assert r["again"] == 2, "resumed from the newest verified step"
