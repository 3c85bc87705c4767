"""examples/launch/slurm_70b.sbatch requeues a run that stopped with a checkpoint (issue 23,
item 11).

No Slurm here: ``srun`` and ``scontrol`` are stand-ins on PATH. The stand-in srun does what
srun does for one task (sets SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, runs the command and
returns its exit code); everything else is real: the batch script, the training process on
the tiny CPU config, its exit code and the script's decision. The stand-in scontrol names the
host and records a requeue.
"""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from tests.support.training import REPO, free_port

pytestmark = pytest.mark.slow

SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1 "$@"
"""
SCONTROL = """#!/usr/bin/env bash
if [ "$1" = show ]; then echo 127.0.0.1; else echo "$@" >> "$SCONTROL_LOG"; fi
"""


def _stand_ins(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _submit(tmp_path, restarts, *overrides):
    bin_dir = _stand_ins(tmp_path) if not (tmp_path / "bin").is_dir() else tmp_path / "bin"
    log = tmp_path / "scontrol.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="node001", SLURM_RESTART_COUNT=str(restarts),
               SCONTROL_LOG=str(log), MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               CONFIG=str(REPO / "configs" / "tiny_cpu.yaml"), PYTHONPATH=str(REPO))
    result = subprocess.run(
        ["bash", str(REPO / "examples" / "launch" / "slurm_70b.sbatch"),
         f"train.output_dir={tmp_path / 'run'}", "train.progress=false",
         "train.tensorboard=false", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    requeues = log.read_text().splitlines() if log.is_file() else []
    log.unlink(missing_ok=True)
    return result, requeues


def test_a_run_stopped_with_a_checkpoint_is_requeued_and_a_finished_one_is_not(tmp_path):
    # the wall-time budget runs out after the first step: a checkpoint, exit 75
    stopped, requeues = _submit(tmp_path, 0, "train.max_steps=30",
                                "train.exit_after_minutes=0.0001")
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert requeues == ["requeue 4242"], stopped.stdout
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_0000001"

    # the requeue limit reached: the same stop is not requeued again
    again, requeues = _submit(tmp_path, 50, "train.max_steps=30",
                              "train.exit_after_minutes=0.0001")
    assert again.returncode == 75 and requeues == [], again.stdout

    # the requeued job resumes and finishes: exit 0, no requeue
    finished, requeues = _submit(tmp_path, 2, "train.max_steps=4")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert requeues == []
    assert "resumed from" in finished.stdout
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_0000004"
