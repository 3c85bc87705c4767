"""Checkpoints: exact resume, loading on another layout, and a save killed halfway."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.support.distributed import run_distributed
from tests.support.training import tiny_config

# every test here spawns processes or runs training steps
pytestmark = pytest.mark.slow

ADAM = {"optimizer.optimizer": "adam", "optimizer.lr": 1e-3, "optimizer.adam_beta2": 0.95,
        "optimizer.lr_decay_style": "constant"}


def _train(overrides):
    from adadpo_megatron.training.trainer import Trainer

    trainer = Trainer(tiny_config({**ADAM, **overrides})).setup()
    try:
        history = trainer.train()  # every rank trains; the logging rank has the metrics
        return trainer.start_step, history if trainer.is_logging_rank else None
    finally:
        trainer.close()


def _exact_resume_worker(rank, world, out_dir, result_path, loss):
    straight = _train({"train.output_dir": out_dir, "train.max_steps": 4,
                       "train.save_interval": 2, "train.keep_checkpoints": 3, **loss})[1]
    # pretend the run died after step 2's checkpoint: point latest back at it
    root = os.path.join(out_dir, "checkpoints")
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_0000002\n")
    start, resumed = _train({"train.output_dir": out_dir, "train.max_steps": 4, **loss})
    torch.save({"straight": straight, "start": start, "resumed": resumed}, result_path)


# MPO's bco_pair term reads a running reward mean that the checkpoint must carry
@pytest.mark.parametrize("loss", [{}, {"loss.loss_type": ["sigmoid", "bco_pair", "sft"],
                                       "loss.loss_weights": [0.8, 0.2, 1.0]}],
                         ids=["dpo", "mpo"])
def test_resume_continues_exactly(tmp_path, loss):
    out = tmp_path / "result.pt"
    run_distributed(_exact_resume_worker, 1, str(tmp_path / "run"), str(out), loss)
    result = torch.load(out, weights_only=False)
    assert result["start"] == 2
    assert [m["step"] for m in result["resumed"]] == [2, 3]
    keys = ["loss", "grad_norm", "rewards/margins", "learning_rate"]
    if loss:
        keys.append("bco/delta")
        assert result["straight"][2]["bco/delta"] != 0.0
    for got, want in zip(result["resumed"], result["straight"][2:], strict=True):
        for key in keys:
            assert got[key] == want[key], (key, got[key], want[key])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4, "metrics.jsonl keeps steps 0-1 and has 2-3 once"


def _save_worker(rank, world, out_dir, layout):
    _train({"train.output_dir": out_dir, "train.max_steps": 2, **layout})


def _continue_worker(rank, world, checkpoint, out_dir, layout, result_path):
    start, history = _train({"train.output_dir": out_dir, "train.max_steps": 4,
                             "train.resume": checkpoint, **layout})
    if history is not None:
        torch.save({"start": start, "history": history}, result_path)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    out = tmp / "r.pt"
    run_distributed(_continue_worker, 1, "never", str(tmp / "run"), {}, str(out))
    return torch.load(out, weights_only=False)["history"]


@pytest.fixture(scope="module")
def saved_on_tp2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp2")
    run_distributed(_save_worker, 2, str(tmp / "run"),
                    {"parallel.tensor_model_parallel_size": 2})
    return str(tmp / "run" / "checkpoints" / "step_0000002")


@pytest.mark.parametrize("world,layout", [
    (1, {}),
    (2, {"parallel.pipeline_model_parallel_size": 2}),
    (2, {"parallel.pipeline_model_parallel_size": 2,
         "parallel.virtual_pipeline_model_parallel_size": 2}),
    (2, {"parallel.context_parallel_size": 2}),
], ids=["single", "pp2", "pp2_vpp2", "cp2"])
def test_checkpoint_from_tp2_continues_on_another_layout(saved_on_tp2, uninterrupted,
                                                          tmp_path, world, layout):
    _assert_continues(saved_on_tp2, uninterrupted, tmp_path, world, layout)


def _assert_continues(checkpoint, uninterrupted, tmp_path, world, layout):
    """The run continued from ``checkpoint`` on ``layout`` repeats the uninterrupted one's
    steps 2 and 3 (to 1e-5: two layouts round differently)."""
    out = tmp_path / "r.pt"
    run_distributed(_continue_worker, world, checkpoint, str(tmp_path / "run"), layout,
                    str(out))
    result = torch.load(out, weights_only=False)
    assert result["start"] == 2
    for got, want in zip(result["history"], uninterrupted[2:], strict=True):
        assert got["step"] == want["step"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)


@pytest.fixture(scope="module")
def saved_on_cp2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp2")
    run_distributed(_save_worker, 2, str(tmp / "run"), {"parallel.context_parallel_size": 2})
    return str(tmp / "run" / "checkpoints" / "step_0000002")


def test_checkpoint_from_cp2_continues_on_one_process(saved_on_cp2, uninterrupted, tmp_path):
    """Context parallelism changed between runs (CP 2 -> 1; TP 2 -> CP 2 above): the model
    and Adam's state are the same tensors on every CP size."""
    _assert_continues(saved_on_cp2, uninterrupted, tmp_path, 1, {})


def _killed_save_worker(rank, world, out_dir, result_path):
    from adadpo_megatron.training.checkpointing import checkpoint
    from adadpo_megatron.training.trainer import Trainer

    _train({"train.output_dir": out_dir, "train.max_steps": 2})
    trainer = Trainer(tiny_config({**ADAM, "train.output_dir": out_dir,
                                   "train.max_steps": 4})).setup()
    trainer.train_step(2)
    real_replace = os.replace

    def killed(src, dst):  # the process dies as the finished shards are about to be published
        raise KeyboardInterrupt("killed")

    checkpoint.os.replace = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save_checkpoint(trainer.checkpoint_state(), 3)
    finally:
        checkpoint.os.replace = real_replace
        trainer.close()
    start, history = _train({"train.output_dir": out_dir, "train.max_steps": 3})
    torch.save({"start": start, "steps": [m["step"] for m in history]}, result_path)


def test_save_killed_halfway_leaves_the_previous_checkpoint(tmp_path):
    out = tmp_path / "r.pt"
    run_dir = tmp_path / "run"
    run_distributed(_killed_save_worker, 1, str(run_dir), str(out))
    result = torch.load(out, weights_only=False)
    assert result == {"start": 2, "steps": [2]}
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


def test_latest_pointing_at_a_missing_checkpoint_is_an_error(tmp_path):
    from adadpo_megatron.training.checkpointing.checkpoint import latest_checkpoint

    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "latest").write_text("step_0000009\n")
    with pytest.raises(FileNotFoundError, match="step_0000009, which is not a complete"):
        latest_checkpoint(str(tmp_path))
    shutil.rmtree(root)
    assert latest_checkpoint(str(tmp_path)) is None


def _start_from_checkpoint_worker(rank, world, tmp, result_path):
    from adadpo_megatron.training.trainer import Trainer
    from tests.support.training import gather_full_parameters

    trained = Trainer(tiny_config({**ADAM, "train.output_dir": f"{tmp}/a",
                                   "train.max_steps": 2})).setup()
    trained.train()
    expected = gather_full_parameters(trained)
    trained.close()
    checkpoint = f"{tmp}/a/checkpoints/step_0000002"
    # a new run on another layout whose policy and reference start from that checkpoint
    fresh = Trainer(tiny_config({**ADAM, "train.output_dir": f"{tmp}/b", "model.load": checkpoint,
                                 "parallel.pipeline_model_parallel_size": world})).setup()
    params = gather_full_parameters(fresh)
    first = fresh.train_step(0)
    fresh.close()
    if rank == world - 1:
        torch.save({"expected": expected, "params": params, "loss": first["loss"]}, result_path)


def test_policy_and_reference_start_from_a_megatron_checkpoint(tmp_path):
    out = tmp_path / "r.pt"
    run_distributed(_start_from_checkpoint_worker, 2, str(tmp_path), str(out))
    result = torch.load(out, weights_only=False)
    for name, value in result["expected"].items():
        torch.testing.assert_close(result["params"][name], value, rtol=0, atol=0)
    # the reference loaded the same weights: step 0 is ln 2 again
    assert result["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)


def _non_finite_worker(rank, world, which, result_path):
    from adadpo_megatron.training.trainer import NonFiniteError, Trainer
    from tests.support.training import gather_full_parameters

    trainer = Trainer(tiny_config({**ADAM, "parallel.pipeline_model_parallel_size": world,
                                   "train.max_steps": 3, "train.output_dir": result_path + ".d"})
                      ).setup()
    trainer.train_step(0)
    if which == "loss":  # an infinite embedding row for the byte 'a' (in most prompts)
        for chunk in trainer.model:
            for name, param in chunk.module.named_parameters():
                if name == "embedding.word_embeddings.weight":
                    with torch.no_grad():
                        param[97] = float("inf")
    else:
        param = next(p for c in trainer.model for n, p in c.module.named_parameters()
                     if n.endswith("layers.0.mlp.linear_fc2.weight"))
        param.register_hook(lambda grad: grad * float("nan"))
    before = gather_full_parameters(trainer)
    with pytest.raises(NonFiniteError) as error:
        trainer.train_step(1)
    after = gather_full_parameters(trainer)
    trainer.close()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed after a non-finite step"
    if rank == 0:
        torch.save(str(error.value), result_path)


@pytest.mark.parametrize("which", ["loss", "gradient"])
def test_non_finite_step_stops_on_every_rank_before_the_weights_change(tmp_path, which):
    out = tmp_path / "message.pt"
    run_distributed(_non_finite_worker, 2, which, str(out))
    message = torch.load(out)
    if which == "loss":
        assert message.startswith("step 1: non-finite loss in micro-batch ")
        assert "(examples [" in message
    else:
        assert message.startswith("step 1: the losses were finite but a gradient is not")
    assert "Stopped before the optimizer step" in message


def _mismatch_worker(rank, world, tmp, result_path):
    from adadpo_megatron.training.trainer import Trainer

    saved = Trainer(tiny_config({"train.output_dir": f"{tmp}/a"})).setup()
    saved.train()  # one step, then the final checkpoint
    saved.close()
    checkpoint = f"{tmp}/a/checkpoints/step_0000001"
    errors = {}
    for name, overrides in (("vocabulary", {"model.make_vocab_size_divisible_by": 512}),
                            ("hidden", {"model.hidden_size": 48}),
                            ("layers", {"model.num_layers": 2})):
        try:
            Trainer(tiny_config({**overrides, "model.load": checkpoint,
                                 "train.output_dir": f"{tmp}/{name}"})).setup()
        except ValueError as err:
            errors[name] = str(err)
        finally:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
    if rank == world - 1:
        torch.save(errors, result_path)


def test_a_checkpoint_of_other_shapes_is_refused_naming_the_tensor(tmp_path):
    """megatron-core alone loads a smaller vocabulary into a larger one without a word."""
    out = tmp_path / "errors.pt"
    run_distributed(_mismatch_worker, 2, str(tmp_path), str(out))
    errors = torch.load(out)
    assert "'embedding.word_embeddings.weight' has shape (384, 32) in the checkpoint but " \
           "(512, 32) in the model" in errors["vocabulary"]
    assert "shape (384, 32) in the checkpoint but (384, 48)" in errors["hidden"]
    assert "has shape (4," in errors["layers"] and "but (2," in errors["layers"]


def _megatron_root_worker(rank, world, tmp, result_path):
    from adadpo_megatron.training.trainer import Trainer
    from tests.support.training import gather_full_parameters

    trained = Trainer(tiny_config({"train.output_dir": f"{tmp}/a"})).setup()
    trained.train()
    expected = gather_full_parameters(trained)
    trained.close()
    if rank == 0:  # a Megatron-LM checkpoint root: the tracker file and iter_* folders
        root = os.path.join(tmp, "megatron_root")
        os.makedirs(root)
        shutil.copytree(f"{tmp}/a/checkpoints/step_0000001", f"{root}/iter_0000001")
        with open(f"{root}/latest_checkpointed_iteration.txt", "w") as f:
            f.write("1\n")
    torch.distributed.barrier()
    fresh = Trainer(tiny_config({"model.load": f"{tmp}/megatron_root",
                                 "train.output_dir": f"{tmp}/b"})).setup()
    params = gather_full_parameters(fresh)
    fresh.close()
    if rank == 0:
        torch.save({"expected": expected, "params": params}, result_path)


def test_model_load_follows_a_megatron_lm_checkpoint_root(tmp_path):
    out = tmp_path / "root.pt"
    run_distributed(_megatron_root_worker, 1, str(tmp_path), str(out))
    result = torch.load(out)
    for name, value in result["expected"].items():
        assert torch.equal(result["params"][name], value), name


def _save_sharded_worker(rank, world, directory):
    import multiprocessing

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from adadpo_megatron.mcore import cpu_compat
    from adadpo_megatron.training.checkpointing.checkpoint import save_sharded

    cpu_compat.enable()

    def sharded(shard):  # rows [4 rank, 4 rank + 4) of an [8, 3] tensor
        return {"w": ShardedTensor.from_rank_offsets("w", shard, (0, rank, world))}

    mine = torch.arange(12, dtype=torch.float32).reshape(4, 3) + 100 * rank
    save_sharded(sharded(mine), directory)
    # written without megatron-core's Manager server process, which stays its own afterwards
    assert multiprocessing.active_children() == [], multiprocessing.active_children()
    assert filesystem_async._results_queue is None
    loaded = dist_checkpointing.load(sharded(torch.empty(4, 3)), directory)
    assert torch.equal(loaded["w"], mine)  # a copy of bytes: exact


def test_a_synchronous_save_writes_every_rank_without_a_helper_process(tmp_path):
    (tmp_path / "ckpt").mkdir()
    run_distributed(_save_sharded_worker, 2, str(tmp_path / "ckpt"))
