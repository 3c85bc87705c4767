"""The demo's two stages (examples/demo.sh without the venv set-up), with its configs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.training import REPO

# every test here spawns processes or runs training steps
pytestmark = pytest.mark.slow


def _run(*args):
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                            timeout=600, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_demo_reaches_the_promised_held_out_accuracy(tmp_path):
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "adadpo_megatron"]
    sft, dpo = tmp_path / "sft", tmp_path / "adadpo"
    _run(*torchrun, "--config", "configs/demo_sft.yaml", f"train.output_dir={sft}",
         "train.progress=false")
    _run(*torchrun, "--config", "configs/demo_adadpo.yaml", f"train.output_dir={dpo}",
         f"model.load={sft}", "train.progress=false")
    _run("-m", "adadpo_megatron.training.reporting.plots", str(dpo))
    out = _run("-m", "adadpo_megatron.training.reporting.summary", str(dpo),
               "--min-eval-accuracy", "0.75")
    assert "held-out reward accuracy" in out
    assert (dpo / "summary.md").is_file()
    for name in ("loss", "rewards", "accuracy", "coefficient"):
        assert (dpo / "plots" / f"{name}.png").stat().st_size > 1000
