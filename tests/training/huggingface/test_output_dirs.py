"""adadpo-import-hf and adadpo-export-hf never destroy a user's files (issue 23 B), and a
damaged safetensors file is one error line naming it (issue 23, item 12).

Through the real commands (``python -m`` subprocesses, as a user runs them) on a tiny Llama
and on a real one-step run from it: an OUT that is, holds or lies inside what the command
reads is refused whatever the flags, a foreign non-empty OUT only with --overwrite, and the
new directory replaces the old one whole, so nothing stale is left beside it; a write killed
or failing half-way leaves the old OUT as it was. Oracle: the directories' bytes before and
after.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from adadpo_megatron.training.huggingface.output_dirs import OLD_SUFFIX, TMP_SUFFIX
from tests.support.commands import one_error_line, run_command
from tests.support.distributed import run_distributed
from tests.support.hf_models import hf_config, make_hf_model, make_pairs
from tests.support.training import REPO

IMPORT, EXPORT = "import-hf", "export-hf"  # python -m adadpo_megatron's commands
IMPORTED = {".metadata", "__0_0.distcp", "metadata.json", "hf_source.json"}
EXPORTED = {"adadpo_export.json", "config.json", "generation_config.json",
            "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def _cli(command, *args):
    """Runs ``python -m adadpo_megatron command args``: (exit code, stderr)."""
    result = run_command([sys.executable, "-m", "adadpo_megatron", command, *args], timeout=300)
    return result.returncode, result.stderr




def _snapshot(directory):
    """{relative path: bytes} of every file under ``directory``."""
    directory = pathlib.Path(directory)
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _names(directory):
    return {p.name for p in pathlib.Path(directory).iterdir()}


def _no_leftovers(directory):
    return not any(p.name.endswith((TMP_SUFFIX, OLD_SUFFIX))
                   for p in pathlib.Path(directory).iterdir())


def _train_worker(rank, world, tmp, data, run="run", overrides=None):
    from adadpo_megatron.training.trainer import Trainer

    tmp = pathlib.Path(tmp)
    config = hf_config(tmp, "llama3", data, **{"train.output_dir": str(tmp / run),
                                                "train.max_steps": 1, **(overrides or {})})
    trainer = Trainer(config).setup()
    try:
        trainer.train()  # saves the final checkpoint
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(folder, the tiny Llama's directory, a real one-step run from it as model.hf)."""
    tmp = tmp_path_factory.mktemp("safety")
    make_hf_model(tmp / "llama3", "llama3")
    run_distributed(_train_worker, 1, str(tmp), make_pairs(tmp / "pairs.jsonl"))
    return tmp, tmp / "llama3", tmp / "run"


@pytest.fixture(scope="module")
def lora_run(llama):
    """A real one-step LoRA run on the tiny Llama (model.hf)."""
    tmp, _, _ = llama
    lora = {"rank": 4, "alpha": 8.0, "target_modules": ["linear_qkv", "linear_proj"]}
    run_distributed(_train_worker, 1, str(tmp), str(tmp / "pairs.jsonl"), "lora_run",
                    {"model.lora": lora, "reference.mode": "adapters_off"})
    return tmp / "lora_run"


# --------------------------------------------------------------------------- import


@pytest.mark.slow
@pytest.mark.parametrize("where", ["is", "symlink", "inside", "holds"])
def test_import_refuses_an_out_that_is_holds_or_lies_inside_the_source(llama, tmp_path,
                                                                        where):
    """Before: adadpo-import-hf SRC SRC deleted the source model. Now refused with or
    without --overwrite, and SRC (and its folder) stay byte for byte."""
    tmp, source, _ = llama
    (tmp_path / "link").symlink_to(source)
    out = {"is": source, "symlink": tmp_path / "link", "inside": source / "megatron",
           "holds": tmp}[where]
    relation = {"symlink": "is", "inside": "lies inside"}.get(where, where)
    before = _snapshot(tmp)
    code, stderr = _cli(IMPORT, source, out, "--overwrite")
    assert code == 2
    line = one_error_line(stderr, "adadpo-import-hf")
    assert f"{out} {relation} the source model ({source})" in line, line
    assert "refused even with --overwrite" in line
    assert _snapshot(tmp) == before


@pytest.mark.slow
def test_import_replaces_a_foreign_directory_only_with_overwrite(llama, tmp_path):
    """A non-empty OUT it did not write is refused and kept; --overwrite replaces it whole
    (no foreign file left); an OUT it wrote is replaced without asking."""
    _, source, _ = llama
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    (out / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    before = _snapshot(out)
    code, stderr = _cli(IMPORT, source, out)
    assert code == 2
    line = one_error_line(stderr, "adadpo-import-hf")
    assert str(out) in line and "--overwrite" in line and "hf_source.json" in line, line
    assert _snapshot(out) == before
    code, stderr = _cli(IMPORT, source, out, "--overwrite")
    assert code == 0, stderr[-3000:]
    assert _names(out) == IMPORTED
    assert _no_leftovers(tmp_path)
    code, stderr = _cli(IMPORT, source, out)  # its own import: replaced without asking
    assert code == 0, stderr[-3000:]
    assert _names(out) == IMPORTED and _no_leftovers(tmp_path)


def _import_worker(rank, world, source, out):
    from adadpo_megatron.training.huggingface.hf_import import import_checkpoint

    import_checkpoint(source, out, pp=world)


@pytest.mark.slow
def test_every_rank_of_a_distributed_import_refuses_alike(llama):
    """Under torchrun rank 0 checks OUT and every rank raises its error: none goes on alone
    to wait for the others (without the broadcast rank 1 hangs and does not report)."""
    _, source, _ = llama
    before = _snapshot(source)
    with pytest.raises(AssertionError) as failed:
        run_distributed(_import_worker, 2, str(source), str(source), timeout=120)
    report = str(failed.value)
    assert "did not report" not in report, report
    assert "rank 0:" in report and "rank 1:" in report, report
    assert report.count(f"ValueError: the output directory {source} is the source") == 2
    assert _snapshot(source) == before


# --------------------------------------------------------------------------- export


def _checkpoint(run):
    return next((run / "checkpoints").glob("step_*"))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["model_hf", "output_dir", "inside_output_dir",
                                   "checkpoint", "holds_checkpoint"])
def test_export_refuses_what_it_reads(llama, where):
    """Before: OUT = the run's model.hf overwrote the base model, then crashed. Now an OUT
    that is, holds or lies inside the checkpoint, the run's output_dir or its model.hf is
    refused, --overwrite or not, and nothing changes."""
    tmp, source, run = llama
    checkpoint = _checkpoint(run)
    out, relation, what = {
        "model_hf": (source, "is", "the run's model.hf"),
        "output_dir": (run, "is", "the run's output_dir"),
        "inside_output_dir": (run / "exported", "lies inside", "the run's output_dir"),
        "checkpoint": (checkpoint, "is", "the checkpoint"),
        "holds_checkpoint": (run / "checkpoints", "holds", "the checkpoint")}[where]
    before = _snapshot(tmp)
    code, stderr = _cli(EXPORT, run, out, "--overwrite")
    assert code == 2
    line = one_error_line(stderr, "adadpo-export-hf")
    assert f"{out} {relation} {what}" in line, line
    assert _snapshot(tmp) == before


@pytest.mark.slow
def test_export_leaves_nothing_stale_beside_its_files(llama, tmp_path):
    """Before: an export into a directory holding model.safetensors wrote shards beside it,
    and transformers loaded the stale file. Now a foreign directory is refused (kept byte
    for byte), --overwrite gives exactly the export's files, and re-exporting into its own
    directory (no flag needed) leaves no shard or index of the earlier export."""
    _, source, run = llama
    out = tmp_path / "served"
    out.mkdir()
    old_weights = (source / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(old_weights)
    (out / "notes.txt").write_text("the user's")
    before = _snapshot(out)
    code, stderr = _cli(EXPORT, run, out)
    assert code == 2
    line = one_error_line(stderr, "adadpo-export-hf")
    assert str(out) in line and "--overwrite" in line, line
    assert _snapshot(out) == before
    code, stderr = _cli(EXPORT, run, out, "--overwrite")
    assert code == 0, stderr[-3000:]
    assert _names(out) == EXPORTED
    assert (out / "model.safetensors").read_bytes() != old_weights, "the trained weights"
    code, stderr = _cli(EXPORT, run, out, "--shard-gb", 0.0001)  # ours: no flag needed
    assert code == 0, stderr[-3000:]
    shards = _names(out) - EXPORTED
    assert "model.safetensors" not in _names(out) and "model.safetensors.index.json" in shards
    assert len(shards) > 2
    code, stderr = _cli(EXPORT, run, out)
    assert code == 0, stderr[-3000:]
    assert _names(out) == EXPORTED and _no_leftovers(tmp_path)


@pytest.mark.slow
def test_a_peft_export_is_replaced_whole(lora_run, tmp_path):
    """--peft writes through the same checks and rename: a foreign directory needs
    --overwrite, and the merged export later written into the PEFT directory (its own, no
    flag) leaves no adapter file beside the merged weights."""
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"an older adapter")
    before = _snapshot(out)
    code, stderr = _cli(EXPORT, lora_run, out, "--peft")
    assert code == 2 and "--overwrite" in one_error_line(stderr, "adadpo-export-hf")
    assert _snapshot(out) == before
    code, stderr = _cli(EXPORT, lora_run, out, "--peft", "--overwrite")
    assert code == 0, stderr[-3000:]
    assert _names(out) == {"adapter_config.json", "adapter_model.safetensors",
                           "adadpo_export.json", "tokenizer.json", "tokenizer_config.json"}
    code, stderr = _cli(EXPORT, lora_run, out)
    assert code == 0, stderr[-3000:]
    assert _names(out) == EXPORTED and _no_leftovers(tmp_path)


def _copy_checkpoint(run, tmp_path):
    """A copy of the run's checkpoint (its sources still name the run's model.hf) and its
    data files."""
    copy = tmp_path / "checkpoint"
    shutil.copytree(_checkpoint(run), copy)
    return copy, sorted(copy.glob("*.distcp"))


@pytest.mark.slow
def test_a_killed_export_leaves_the_old_out_whole(llama, tmp_path):
    """SIGKILL while the export writes: its checkpoint's data files are named pipes, so the
    export blocks reading them once its temporary sibling exists (as on a hung network
    filesystem). The old OUT is whole; OUT.adadpo-tmp (empty here) and the lock's file (held
    by nobody once its process is dead) are all that is left, and the next export removes
    both."""
    _, _, run = llama
    checkpoint, data_files = _copy_checkpoint(run, tmp_path)
    out = tmp_path / "served"
    assert _cli(EXPORT, checkpoint, out)[0] == 0
    before = _snapshot(out)
    saved = {path: path.read_bytes() for path in data_files}
    for path in data_files:
        path.unlink()
        os.mkfifo(path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "adadpo_megatron", EXPORT,
                                str(checkpoint), str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    tmp = out.with_name(out.name + TMP_SUFFIX)
    try:
        deadline = time.monotonic() + 240
        while not tmp.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tmp.is_dir(), "the export writes into a temporary sibling"
        time.sleep(0.5)
        assert process.poll() is None, "it is blocked reading, mid-write"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert _snapshot(out) == before
    assert _names(tmp_path) == {"checkpoint", "served", "served" + TMP_SUFFIX,
                                "served.adadpo-lock"}
    for path, content in saved.items():
        path.unlink()
        path.write_bytes(content)
    code, stderr = _cli(EXPORT, checkpoint, out)
    assert code == 0, stderr[-3000:]
    assert _names(tmp_path) == {"checkpoint", "served"} and _names(out) == EXPORTED


@pytest.mark.slow
def test_a_failing_export_leaves_the_old_out_whole(llama, tmp_path):
    """An export that fails while it writes (its checkpoint's data cut in half, read after
    the temporary sibling is made) leaves the old OUT byte for byte and no sibling."""
    _, _, run = llama
    checkpoint, data_files = _copy_checkpoint(run, tmp_path)
    out = tmp_path / "served"
    assert _cli(EXPORT, checkpoint, out)[0] == 0
    before = _snapshot(out)
    for path in data_files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, _ = _cli(EXPORT, checkpoint, out)
    assert code != 0
    assert _snapshot(out) == before
    assert _names(tmp_path) == {"checkpoint", "served"}


# --------------------------------------------------------------------------- damaged files


def _damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # a header of the right length that is not JSON
        length = int.from_bytes(data[:8], "little")
        path.write_bytes(data[:8] + b"\x01" * length + data[8 + length:])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "header_not_json"])
def test_a_damaged_safetensors_is_one_error_line(llama, tmp_path, how):
    """Before: a 20-45 line traceback from inside safetensors. Now exit 2 and one line that
    names the file; OUT is not created."""
    _, source, _ = llama
    damaged = tmp_path / "damaged"
    shutil.copytree(source, damaged)
    _damage(damaged / "model.safetensors", how)
    code, stderr = _cli(IMPORT, damaged, tmp_path / "out")
    assert code == 2
    line = one_error_line(stderr, "adadpo-import-hf")
    assert f"{damaged / 'model.safetensors'} is truncated or damaged" in line, line
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


def test_a_damaged_shard_is_named_when_read(tmp_path):
    """The reader model.hf, adadpo-import-hf and the LoRA merge share (HFTensors): a shard
    of an indexed model, cut short, is a ValueError naming that shard; a damaged index too."""
    import json

    import torch
    from safetensors.torch import save_file

    from adadpo_megatron.mcore.hf_mapping import HFTensors

    save_file({"a": torch.ones(4)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(400)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    _damage(tmp_path / "model-00002-of-00002.safetensors", "truncated")
    tensors = HFTensors(tmp_path)
    assert torch.equal(tensors.get("a"), torch.ones(4))
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors is truncated"):
        tensors.get("b")
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    with pytest.raises(ValueError, match="index.json is truncated or damaged"):
        HFTensors(tmp_path)


# --------------------------------------------------------------------------- output_dirs


def test_a_write_that_raises_keeps_the_old_directory(tmp_path):
    from adadpo_megatron.training.huggingface.output_dirs import atomic_directory

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_directory(out) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("half-way")
    assert _snapshot(out) == {"old.txt": b"old"} and _names(tmp_path) == {"out"}
    with atomic_directory(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _snapshot(out) == {"new.txt": b"new"} and _names(tmp_path) == {"out"}


def test_a_write_killed_between_its_renames_gets_the_old_directory_back(tmp_path):
    """Killed after the old OUT was moved aside and before the new one took its place: the
    next check finds OUT.adadpo-old and no OUT, and renames it back before judging OUT."""
    from adadpo_megatron.training.huggingface.output_dirs import check_output

    out = tmp_path / "out"
    aside = tmp_path / ("out" + OLD_SUFFIX)
    aside.mkdir()
    (aside / "notes.txt").write_text("the user's")
    (tmp_path / ("out" + TMP_SUFFIX)).mkdir()
    with pytest.raises(ValueError, match="--overwrite"):
        check_output(out, {}, "marker.json", overwrite=False)
    assert _snapshot(out) == {"notes.txt": b"the user's"} and _names(tmp_path) == {"out"}


def test_the_next_write_clears_what_a_killed_one_left(tmp_path):
    """What a killed write left (a half-built OUT.adadpo-tmp; an old OUT.adadpo-old beside
    the new OUT) is removed by the next write, with no check before it (the run's own
    output_dir/hf_import cache is written so)."""
    from adadpo_megatron.training.huggingface.output_dirs import atomic_directory

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    for leftover in (TMP_SUFFIX, OLD_SUFFIX):
        (tmp_path / ("out" + leftover)).mkdir()
        (tmp_path / ("out" + leftover) / "half.bin").write_bytes(b"\0")
    with atomic_directory(out) as tmp:
        assert _names(tmp) == set()
        (tmp / "new.txt").write_text("new")
    assert _snapshot(out) == {"new.txt": b"new"} and _names(tmp_path) == {"out"}


@pytest.mark.slow
def test_one_command_writes_an_out_at_a_time(llama, tmp_path):
    """Issue 23 review: two imports into one OUT removed each other's temporary sibling and
    wrote into the same one; the survivor said it wrote SRC, with the other's weights. Now a
    second command into an OUT another holds is refused, naming the holder (a process of
    its own: record locks are per process)."""
    _, _, run = llama
    out = tmp_path / "served"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from adadpo_megatron.training.huggingface.output_dirs import claimed\n"
         f"with claimed({str(out)!r}, {{}}, 'adadpo_export.json', False):\n"
         "    print('held', flush=True)\n"
         "    time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        code, stderr = _cli(EXPORT, run, out)
        assert code == 2
        assert f"is being written by another command (pid {holder.pid} on host " in \
            one_error_line(stderr, "adadpo-export-hf")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    code, stderr = _cli(EXPORT, run, out)  # the lock went with its process
    assert code == 0, stderr[-3000:]
    assert not out.with_name(out.name + ".adadpo-lock").exists(), "the lock's file is left"


def test_an_empty_out_or_the_working_directory_is_refused_whatever_the_flags(tmp_path,
                                                                             monkeypatch):
    """Issue 23 review: an unset $OUT made OUT "", which resolved to the working directory,
    and --overwrite replaced it with the export."""
    from adadpo_megatron.training.huggingface.output_dirs import check_output

    (tmp_path / "work.txt").write_text("the user's")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="the output directory is empty: name one"):
        check_output("", {}, "marker.json", overwrite=True)
    for out in (".", str(tmp_path)):
        with pytest.raises(ValueError, match=r"is the working directory .* refused even with "
                                             r"--overwrite"):
            check_output(out, {}, "marker.json", overwrite=True)
    with pytest.raises(ValueError, match=r"holds the working directory"):
        check_output("..", {}, "marker.json", overwrite=True)
    assert (tmp_path / "work.txt").read_text() == "the user's"


def test_an_out_inside_the_working_directory_is_the_usual_case(tmp_path, monkeypatch):
    """``adadpo-export-hf RUN ./hf`` writes inside the working directory, which it neither
    reads nor replaces: only an OUT that is or holds the working directory is refused (the
    review of issue 23's guard had refused every OUT below it)."""
    from adadpo_megatron.training.huggingface.output_dirs import check_output

    monkeypatch.chdir(tmp_path)
    assert check_output("hf", {}, "marker.json", overwrite=False) == tmp_path / "hf"
    nested = tmp_path / "exports" / "hf"
    assert check_output(str(nested), {}, "marker.json", overwrite=False) == nested
