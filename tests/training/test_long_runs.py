"""What a long multi-node run meets (issue 13): preemption, reused or shared run directories,
hung ranks, changed configs on resume, a busy default port. Real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from adadpo_megatron.training.checkpointing.resume_checks import check_resume
from adadpo_megatron.training.checkpointing.run_dir import (
    LOCK_FILE,
    RunDirectoryError,
    RunDirectoryLock,
)
from adadpo_megatron.training.preemption import PREEMPTED_EXIT_CODE
from adadpo_megatron.training.reporting.run_log import _kept_lines
from tests.support.commands import TINY_CPU, command_env, run_command
from tests.support.distributed import run_distributed
from tests.support.training import free_port, tiny_config

CLI = TINY_CPU
# constant learning rate: a resumed run and an uninterrupted one of other lengths agree
STEADY = ["optimizer.lr_decay_style=constant", "optimizer.lr_warmup_fraction=0.0",
          "train.progress=false", "train.tensorboard=false", "train.global_batch_size=8",
          "train.micro_batch_size=4"]


def _metrics(out: Path):
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run(args, **kw):
    return run_command(CLI + STEADY + args, **kw)


def _signal_after(command, out: Path, steps: int, sig=signal.SIGTERM):
    """Starts ``command``, sends ``sig`` once metrics.jsonl has ``steps`` lines; returns the
    finished process."""
    proc = subprocess.Popen(command, env=command_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while len(_metrics(out)) < steps:
        if proc.poll() is not None or time.monotonic() > deadline:
            output = proc.communicate()[0] if proc.poll() is not None else ""
            proc.kill()
            raise AssertionError(f"the run ended or stalled before step {steps}:\n{output}")
        time.sleep(0.2)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=300)
    proc.output = output
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["single", "torchrun"])
def test_sigterm_saves_a_checkpoint_and_resume_continues_exactly(tmp_path, launcher):
    """Issue 13, defect 2: SIGTERM used to exit 143 with no checkpoint."""
    out = tmp_path / "run"
    args = [f"train.output_dir={out}", "train.max_steps=400", "train.save_interval=1000"]
    command = CLI + STEADY + args
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_port", str(free_port()), "-m", "adadpo_megatron", *command[3:],
                   "parallel.tensor_model_parallel_size=2"]
    proc = _signal_after(command, out, steps=3)
    if launcher == "single":
        assert proc.returncode == PREEMPTED_EXIT_CODE, proc.output
    else:  # torchrun forwards the signal to its workers, then exits 1 itself (docs/TRAINING.md)
        assert proc.returncode != 0, proc.output
    assert "stopped early (SIGTERM" in proc.output, proc.output
    stopped = len(_metrics(out))
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped:07d}", (latest, stopped)

    # resume (on one process: the layout may change) to two steps past the stop, and an
    # uninterrupted one-process run of the same length
    resumed = _run([f"train.output_dir={out}", f"train.max_steps={stopped + 2}"])
    assert resumed.returncode == 0, resumed.stderr
    straight_dir = tmp_path / "straight"
    straight = _run([f"train.output_dir={straight_dir}", f"train.max_steps={stopped + 2}"])
    assert straight.returncode == 0, straight.stderr
    # bitwise on one process; TP=2 sums the vocabulary in another order (1e-5, as every
    # layout test)
    rel = 1e-6 if launcher == "single" else 1e-5
    got = {m["step"]: m for m in _metrics(out)}
    want = {m["step"]: m for m in _metrics(straight_dir)}
    assert sorted(got) == sorted(want) == list(range(stopped + 2))
    for step in (stopped, stopped + 1):
        for key in ("loss", "grad_norm"):
            assert got[step][key] == pytest.approx(want[step][key], rel=rel, abs=1e-9), \
                (step, key)
        # the margin is beta (0.1) times differences of log-prob sums of tens of nats: their
        # float32 rounding (~1e-7 relative, so ~5e-7 absolute after beta) bounds it, not a
        # share of the small result (seen: 7e-8 apart at 0.00334 after 5 TP=2 steps)
        assert got[step]["rewards/margins"] == pytest.approx(
            want[step]["rewards/margins"], rel=rel, abs=1e-9 if launcher == "single" else 1e-6), \
            (step, "rewards/margins")


@pytest.mark.slow
def test_a_second_signal_exits_at_once(tmp_path):
    script = textwrap.dedent("""
        import time
        from adadpo_megatron.training.preemption import StopRequests
        stop = StopRequests()
        stop.install()
        print("ready", flush=True)
        while True:
            time.sleep(0.05)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=command_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)  # the first only records the request
    time.sleep(0.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM


@pytest.mark.slow
def test_exit_after_minutes_stops_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    done = _run([f"train.output_dir={out}", "train.max_steps=400",
                 "train.exit_after_minutes=0.0001"])
    assert done.returncode == PREEMPTED_EXIT_CODE, done.stderr
    assert "train.exit_after_minutes=0.0001 reached" in done.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000001"


def _setup_outcome(overrides) -> str:
    """"ok" if a trainer with these overrides sets up, else its error's message."""
    from adadpo_megatron.training.trainer import Trainer

    trainer = Trainer(tiny_config(overrides))
    try:
        trainer.setup()
        return "ok"
    except (RunDirectoryError, ValueError) as err:
        return str(err)
    finally:
        trainer.close()


def _setup_worker(rank, world, overrides, result_path):
    torch.save(_setup_outcome(overrides), result_path)


@pytest.mark.slow
def test_a_run_directory_in_use_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    lock = RunDirectoryLock(out)
    lock.acquire()  # this test process holds it, as a running job would
    try:
        result = tmp_path / "result.pt"
        run_distributed(_setup_worker, 1, {"train.output_dir": str(out)}, str(result))
        message = torch.load(result)
        assert f"is in use by another run (pid {os.getpid()} on host " \
               f"{socket.gethostname()})" in message
    finally:
        lock.release()
    assert (out / LOCK_FILE).is_file()


@pytest.mark.slow
def test_a_fresh_run_into_a_used_directory_needs_overwrite(tmp_path):
    """Issue 13, defect 3: a 6-step run, then a 3-step resume=never run into the same
    directory: pruning kept the old step_5 and step_6, deleted the new step_3, and latest named
    a deleted checkpoint; the old metrics were overwritten."""
    out = tmp_path / "run"
    first = _run([f"train.output_dir={out}", "train.max_steps=6", "train.save_interval=1"])
    assert first.returncode == 0, first.stderr
    again = [f"train.output_dir={out}", "train.max_steps=3", "train.save_interval=1",
             "train.resume=never"]
    refused = _run(again)
    assert refused.returncode != 0
    assert "holds checkpoints or metrics of another run" in refused.stderr
    assert "train.overwrite=true" in refused.stderr
    assert len(_metrics(out)) == 6, "the refused run touched nothing"
    replaced = _run(again + ["train.overwrite=true"])
    assert replaced.returncode == 0, replaced.stderr
    root = out / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000002", "step_0000003"]
    assert (root / "latest").read_text().strip() == "step_0000003"
    assert [m["step"] for m in _metrics(out)] == [0, 1, 2]


def test_pruning_never_deletes_latest_or_newer(tmp_path):
    from adadpo_megatron.training.checkpointing.checkpoint import _prune

    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 5, 6):
        (root / f"step_{step:07d}").mkdir(parents=True)
    (root / "latest").write_text("step_0000003\n")
    _prune(root, keep=2)
    assert sorted(p.name for p in root.glob("step_*")) == [
        "step_0000002", "step_0000003", "step_0000005", "step_0000006"]


def test_a_torn_last_metrics_line_is_dropped_and_others_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1}\n{"step": 1, "loss": 2}\n{"step": 2, "lo')
    assert [json.loads(x)["step"] for x in _kept_lines(path, 5)] == [0, 1]
    assert [json.loads(x)["step"] for x in _kept_lines(path, 1)] == [0]
    path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=f"{path}:2 is not a metrics line"):
        _kept_lines(path, 5)


def _hung_rank_worker(rank, port, out_dir, result_path):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from adadpo_megatron.training.trainer import Trainer

    trainer = Trainer(tiny_config({"train.output_dir": out_dir, "train.max_steps": 3,
                                   "train.distributed_timeout_minutes": 0.25})).setup()
    original = trainer.train_step

    def train_step(step):
        if step == 1 and rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)  # hangs, as a wedged GPU or host would
        return original(step)

    trainer.train_step = train_step
    start = time.monotonic()
    try:
        trainer.train()
        outcome = ("finished", 0.0)
    except RuntimeError as err:
        outcome = (f"{type(err).__name__}: {err}", time.monotonic() - start)
    torch.save(outcome, result_path)
    os._exit(0)


@pytest.mark.slow
def test_a_hung_rank_ends_the_job_within_the_timeout(tmp_path):
    """Issue 13, defect 4: a stopped rank blocked the others for more than 15 minutes (the
    init timeout did not reach megatron-core's groups)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    result = tmp_path / "rank0.pt"
    procs = [ctx.Process(target=_hung_rank_worker,
                         args=(r, port, str(tmp_path / "run"), str(result if r == 0 else
                                                                   tmp_path / "rank1.pt")))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        procs[0].join(timeout=240)
        assert not procs[0].is_alive(), "rank 0 still waits for the hung rank"
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join()
    message, waited = torch.load(result)
    assert message.startswith("CollectiveTimeout: step 1: a collective waited more than "
                              "train.distributed_timeout_minutes=0.25"), message
    assert waited < 0.25 * 60 + 30, waited


def _resume_change_worker(rank, world, out_dir, result_path):
    from adadpo_megatron.training.trainer import Trainer

    base = {"train.output_dir": out_dir, "train.max_steps": 1}
    trainer = Trainer(tiny_config(base)).setup()
    try:
        trainer.train()
    finally:
        trainer.close()
    outcomes = {}
    for name, change in (("beta", {"loss.beta": 0.25}),
                         ("beta_allowed", {"loss.beta": 0.25,
                                           "train.resume_allow_changes": ["loss.beta"]}),
                         ("batch", {"train.global_batch_size": 16}),
                         ("layout_and_length", {"train.max_steps": 2,
                                                "train.micro_batch_size": 4})):
        outcomes[name] = _setup_outcome({**base, **change})
    torch.save(outcomes, result_path)


@pytest.mark.slow
def test_resume_refuses_changes_that_alter_the_optimisation(tmp_path):
    result = tmp_path / "result.pt"
    run_distributed(_resume_change_worker, 1, str(tmp_path / "run"), str(result))
    outcomes = torch.load(result)
    assert "loss.beta: 0.5 in the checkpoint, 0.25 now" in outcomes["beta"]
    assert "train.resume_allow_changes" in outcomes["beta"]
    assert outcomes["beta_allowed"] == "ok"
    assert "train.global_batch_size: 8 in the checkpoint, 16 now" in outcomes["batch"]
    assert outcomes["layout_and_length"] == "ok"


def test_resume_check_lists_every_refused_key_and_accepts_the_rest():
    saved = {"loss": {"beta": 0.1, "loss_type": "dpo"}, "train": {"seed": 1, "max_steps": 5},
             "data": {"content": "aaa"}, "parallel": {"tensor_model_parallel_size": 1}}
    current = {"loss": {"beta": 0.2, "loss_type": "ipo"}, "train": {"seed": 1, "max_steps": 9},
               "data": {"content": "bbb"}, "parallel": {"tensor_model_parallel_size": 2}}
    with pytest.raises(ValueError) as err:
        check_resume(saved, current, allowed=[])
    for text in ("data.content: 'aaa' in the checkpoint, 'bbb' now", "loss.beta: 0.1",
                 "loss.loss_type: 'dpo' in the checkpoint, 'ipo' now"):
        assert text in str(err.value)
    accepted = check_resume(saved, current, allowed=["loss", "data.content"])
    assert ("train.max_steps", 5, 9) in accepted
    assert ("parallel.tensor_model_parallel_size", 1, 2) in accepted


@pytest.mark.slow
def test_two_single_process_runs_on_one_host_do_not_share_a_port(tmp_path):
    """Issue 13: the default MASTER_PORT was the constant 29511, so a second single-process
    run on the host failed to start while the first held it."""
    script = textwrap.dedent("""
        import sys, time
        from adadpo_megatron.training.process_groups import init_distributed
        init_distributed(gpu=False, timeout_minutes=1)
        print("up", flush=True)
        time.sleep(float(sys.argv[1]))
    """)
    first = subprocess.Popen([sys.executable, "-c", script, "20"], env=command_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "up", first.stderr.read()
        second = subprocess.run([sys.executable, "-c", script, "0"], env=command_env(),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 0 and second.stdout.strip() == "up", second.stderr
    finally:
        first.kill()
        first.wait()


def test_a_dead_gradient_warns_once_after_the_configured_steps():
    from adadpo_megatron.training.trainer import GradNormWatch

    watch = GradNormWatch(3)
    said = [watch.update(step, norm) for step, norm in
            enumerate([1.0, 0.0, 0.0, 2.0, 0.0, float("nan"), 0.0, 0.0, 0.0])]
    assert [i for i, s in enumerate(said) if s] == [6]
    assert "the gradient norm was 0.0 for 3 consecutive steps (to step 6)" in said[6]


def test_an_unwritable_output_dir_fails_at_start_naming_it(tmp_path):
    """Issue 13: a read-only output directory failed only after the model was built; the
    lock is the first thing a run writes (a path under a file stands in for a read-only
    mount, which root would still write)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(RunDirectoryError, match=r"train.output_dir='.*a_file/run' cannot be "
                                                r"written"):
        RunDirectoryLock(blocker / "run").acquire()


def test_resume_ignores_fields_one_package_version_lacks_but_not_architecture_keys():
    saved = {"loss": {"beta": 0.1}, "model": {"transformer": {"num_layers": 4}}}
    current = {"loss": {"beta": 0.1, "nll_reduction": "pair"},  # a field added since
               "model": {"transformer": {"num_layers": 4, "ffn_hidden_size": 99}}}
    # (an architecture key: refused whatever is allowed, issue 23)
    with pytest.raises(ValueError, match=r"model.ffn_hidden_size=99 \(the checkpoint's is "
                                         r"None\) is not possible"):
        check_resume(saved, current, allowed=[])
    del current["model"]["transformer"]["ffn_hidden_size"]
    assert check_resume(saved, current, allowed=[]) == []


def test_resume_of_a_lora_run_refuses_another_base():
    """A LoRA checkpoint holds the adapters only; model.load, ignored on resume otherwise
    (the checkpoint has the weights), is then the base they were trained on."""
    lora = {"rank": 4, "alpha": 8.0}
    saved = {"model": {"load": "base_a", "lora": lora}}
    with pytest.raises(ValueError, match=r"model.load: 'base_a' in the checkpoint, 'base_b'"):
        check_resume(saved, {"model": {"load": "base_b", "lora": lora}}, allowed=[])
    assert check_resume({"model": {"load": "a"}}, {"model": {"load": "b"}}, allowed=[]) == []
