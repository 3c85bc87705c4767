"""What the operator of a long run reads when something is wrong (issue 23, items 10 and 12).

Real adadpo-train processes: a user error is one line on rank 0 and exit code 2 (not a
traceback), a stop signal during set-up exits 75 like a stop after a step, a full disk says
so and leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from adadpo_megatron.training.checkpointing.run_dir import RunDirectoryLock
from adadpo_megatron.training.preemption import PREEMPTED_EXIT_CODE
from tests.support.commands import TINY_CPU, command_env, one_error_line, run_command
from tests.support.training import DATA

pytestmark = pytest.mark.slow

CLI = [*TINY_CPU, "train.progress=false", "train.tensorboard=false", "train.max_steps=1"]


def _run(*args):
    return run_command([*CLI, *args])


def _one_error_line(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    return one_error_line(result.stderr, "adadpo-train", *fragments)


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    missing = _run(f"train.output_dir={tmp_path / 'a'}", "data.path=/no/such/pairs.jsonl")
    _one_error_line(missing, "data.path='/no/such/pairs.jsonl'")

    bad = tmp_path / "bad.jsonl"
    rows = DATA.read_text().splitlines()[:20]
    row = json.loads(rows[7])
    del row["chosen"]
    rows[7] = json.dumps(row)
    bad.write_text("\n".join(rows) + "\n")
    _one_error_line(_run(f"train.output_dir={tmp_path / 'b'}", f"data.path={bad}"),
                    f"{bad}: row 7", "'chosen'", "data.skip_invalid=true")

    out = tmp_path / "run"
    assert _run(f"train.output_dir={out}").returncode == 0
    _one_error_line(_run(f"train.output_dir={out}", "train.max_steps=2", "loss.beta=0.3"),
                    "loss.beta: 0.1 in the checkpoint, 0.3 now", "train.resume_allow_changes")

    lock = RunDirectoryLock(out)
    lock.acquire()  # as another run holding the directory
    try:
        _one_error_line(_run(f"train.output_dir={out}", "train.max_steps=2"),
                        "is in use by another run")
    finally:
        lock.release()

    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(DATA.read_text().splitlines()[:5]) + "\n")
    warned = _run(f"train.output_dir={tmp_path / 'c'}", f"data.path={small}")
    assert warned.returncode == 0, warned.stderr[-3000:]
    assert "warning: 5 training pairs, fewer than train.global_batch_size=16: pairs repeat " \
           "within every step" in warned.stderr


def test_a_truncated_safetensors_file_is_named(tmp_path):
    from tests.support.hf_models import make_hf_model

    model = make_hf_model(tmp_path / "llama", "llama3")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut inside its header
    result = _run(f"train.output_dir={tmp_path / 'run'}", f"model.hf={model}",
                  "model.preset=null", "data.tokenizer=byte")
    _one_error_line(result, f"{weights}: not a whole safetensors file", "truncated")


def test_a_signal_during_setup_exits_75_with_a_message(tmp_path):
    """Issue 23, item 10: SIGTERM during set-up (minutes at 70B) exited 143 in silence, so
    a requeue script keyed on 75 gave the job up."""
    proc = subprocess.Popen(CLI + [f"train.output_dir={tmp_path / 'run'}"], env=command_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    for line in proc.stdout:  # "data: ..." is printed while the run sets up
        if line.startswith("data:") or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert "adadpo-train: stopped early (SIGTERM during set-up): no step had run" in stderr
    assert "Traceback" not in stderr


def _mount_tmpfs_command(directory: Path, megabytes: int, command) -> list:
    script = ('mount -t tmpfs -o size="$1"m tmpfs "$2" && shift 2 && exec "$@"')
    return ["unshare", "-m", "sh", "-c", script, "sh", str(megabytes), str(directory), *command]


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tmp_path):
    """A 4 MiB filesystem holds one checkpoint of the tiny model (2.5 MB), not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    probe = subprocess.run(_mount_tmpfs_command(disk, 1, ["true"]), capture_output=True)
    if probe.returncode != 0 or shutil.which("unshare") is None:
        pytest.skip(f"no private mount namespace here: {probe.stderr.decode()[:200]}")
    out = disk / "run"
    command = [*CLI, f"train.output_dir={out}", "train.max_steps=3", "train.save_interval=1",
               "data.cache=false"]
    script = (f"mount -t tmpfs -o size=4m tmpfs {disk} && {' '.join(command)}; "
              f"echo rc=$?; ls {out}/checkpoints; cat {out}/checkpoints/latest; "
              f"wc -l < {out}/metrics.jsonl")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], env=command_env(),
                            capture_output=True, text=True, timeout=600)
    listing = result.stdout.split("rc=", 1)[1].split()
    assert listing[0] == "2", result.stderr[-3000:]
    _one_error_line(subprocess.CompletedProcess([], 2, "", result.stderr),
                    "[Errno 28] checkpoint step_0000002 could not be written",
                    "no space left on device", "the partial step directory was removed",
                    "the previous checkpoint, step_0000001, is intact")
    # what is on that filesystem: the first checkpoint, no partial second, latest naming it
    assert listing[1:] == ["latest", "step_0000001", "step_0000001", "2"], listing


def test_a_damaged_checkpoint_is_one_line(tmp_path):
    """Issue 23 review: a truncated shard raised torch's CheckpointException (not an
    Exception) past the one-line handler: a 60-line traceback."""
    out = tmp_path / "run"
    assert _run(f"train.output_dir={out}").returncode == 0
    shard = next((out / "checkpoints" / "step_0000001").glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    _one_error_line(_run(f"train.output_dir={out}", "train.max_steps=2"),
                    "step_0000001 cannot be loaded", "it is damaged or incomplete")


def test_the_command_takes_its_signals_before_importing_torch():
    """Issue 23 review: the handler was installed after the package had imported torch
    (seconds on a shared filesystem), and a SIGTERM in that window exited 143, which a requeue
    script does not requeue. The package and the command module now import nothing heavy."""
    from tests.support.fresh_interpreter import assert_runs_clean

    assert_runs_clean("import sys\n"
                      "import adadpo_megatron.training.cli\n"
                      "assert 'torch' not in sys.modules, 'torch before the handler'\n"
                      "print('ok')\n")
