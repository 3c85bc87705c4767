"""How the commands print a user error (adadpo_megatron/training/errors.py): once, by rank
0, when every rank met it; by the rank that met it otherwise, naming itself."""

from __future__ import annotations

import pytest

from adadpo_megatron.training.errors import fail


def _printed(capsys, monkeypatch, rank: int, error: BaseException) -> str:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.delenv("ADADPO_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_:
        fail("adadpo-train", error)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_an_error_every_rank_met_is_printed_once_by_rank_zero(capsys, monkeypatch):
    error = ValueError("data.path='x.jsonl' is\nneither a file")
    error.on_every_rank = True  # as computed_on_rank_zero marks it
    assert _printed(capsys, monkeypatch, 0, error) == (
        "adadpo-train: error: data.path='x.jsonl' is neither a file (ADADPO_TRACEBACK=1 shows "
        "where)\n")
    assert _printed(capsys, monkeypatch, 3, error) == ""


def test_an_error_one_rank_met_is_printed_by_that_rank(capsys, monkeypatch):
    error = OSError(28, "No space left on device")
    assert _printed(capsys, monkeypatch, 3, error).startswith(
        "adadpo-train: error: rank 3: [Errno 28] No space left on device")
    assert _printed(capsys, monkeypatch, 0, error).startswith(
        "adadpo-train: error: [Errno 28] No space left on device")


def test_the_traceback_switch_re_raises(monkeypatch):
    monkeypatch.setenv("ADADPO_TRACEBACK", "1")
    with pytest.raises(ValueError, match="bad"):
        fail("adadpo-train", ValueError("bad"))
