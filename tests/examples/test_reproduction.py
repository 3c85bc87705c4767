"""The reproduction study's measurements (examples/reproduction/probes.py) and a smoke run of
the study itself.

Oracles: the closed forms of docs/LOSSES.md for the gradient balance (the probe measures it with
autograd), a one-prompt-at-a-time greedy loop for the batched generation, and the trainer's
own held-out evaluation (megatron-core's step and the project's vocab-parallel op) for the
probe's float64 log-probs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.support.training import REPO

sys.path.insert(0, str(REPO / "examples" / "reproduction"))
import probes  # noqa: E402

from adadpo_megatron.ops.loss_config import LossConfig  # noqa: E402


def _synthetic(num_pairs=16, seq=12, seed=0, scale=3.0):
    """Random per-token log-probs and response masks in pair_logps' layout."""
    g = torch.Generator().manual_seed(seed)
    token = -torch.rand(num_pairs, 2, seq, generator=g, dtype=torch.float64) * scale
    lengths = torch.randint(1, seq + 1, (num_pairs, 2), generator=g)
    mask = torch.arange(seq) < lengths.unsqueeze(-1)
    token = torch.where(mask, token, 0.0)
    held = {"token": token, "mask": mask, "sum": token.sum(-1), "count": lengths.double()}
    ref_token = torch.where(mask, token - torch.rand(token.shape, generator=g,
                                                     dtype=torch.float64), 0.0)
    return held, {"sum": ref_token.sum(-1), "count": lengths.double()}


def test_measured_balance_of_dpo_is_the_probability_ratio():
    """DPO's gradients are equal on the log-probs, so per token the chosen side gets
    exp(m_w - m_l) times less (Feng et al.; docs/LOSSES.md): log balance = m_l - m_w."""
    held, ref = _synthetic()
    balance = probes.gradient_balance(held, ref, LossConfig(beta=0.5, adaptive=False))
    mean = held["sum"] / held["count"]
    torch.testing.assert_close(balance["log_token"], mean[:, 1] - mean[:, 0])
    torch.testing.assert_close(balance["log_sequence"], held["sum"][:, 1] - held["sum"][:, 0])


@pytest.mark.parametrize("reduction,key", [("mean", "log_token"), ("sum", "log_sequence")])
def test_measured_balance_of_unclipped_adadpo_is_one(reduction, key):
    """docs/LOSSES.md's checks: balanced per token (mean) or per sequence probability (sum).
    (Short sequences: an unclipped sum ratio of e^30 would saturate the sigmoid, leaving no
    gradient to measure.)"""
    held, ref = _synthetic(seq=4, scale=1.0)
    config = LossConfig(beta=0.5, clip=math.inf, coefficient_reduction=reduction)
    balance = probes.gradient_balance(held, ref, config)
    torch.testing.assert_close(balance[key], torch.zeros(len(held["sum"]), dtype=torch.float64))


def test_a_saturated_pair_has_no_measurable_balance():
    """sigma(-z) underflows to 0 for a huge margin: both gradients are 0 and the ratio is
    NaN (the report leaves such pairs out and counts them), not a made-up number."""
    held, ref = _synthetic(num_pairs=2, seq=4)
    ref["sum"][0] = torch.tensor([-1e5, 0.0], dtype=torch.float64)  # rho_w - rho_l ~ 1e5
    balance = probes.gradient_balance(held, ref, LossConfig(beta=0.5, adaptive=False))
    assert math.isnan(balance["log_token"][0]) and math.isfinite(balance["log_token"][1])


def test_clipped_pairs_are_reported_and_keep_the_clip_ratio():
    held, ref = _synthetic()
    config = LossConfig(beta=0.5, clip=1.2)
    found = probes.coefficients(held, ref, config)
    mean = held["sum"] / held["count"]
    log_r = mean[:, 0] - mean[:, 1]
    assert found["clipped"].tolist() == (log_r > math.log(1.2)).tolist()
    assert 0 < int(found["clipped"].sum()) < len(log_r)  # both cases occur in this draw
    balance = probes.gradient_balance(held, ref, config)["log_token"]
    # clipped: w = C, so the per-token ratio is C / r; unclipped: 1
    expected = torch.where(found["clipped"], math.log(1.2) - log_r, 0.0)
    torch.testing.assert_close(balance, expected)


class _ToyLM(torch.nn.Module):
    """A small causal LM with GPTModel's call signature: logits [b, s, V]."""

    def __init__(self, vocab=12):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, 16)
        self.out = torch.nn.Linear(16, vocab + 3)  # padded past the tokenizer's vocabulary

    def forward(self, tokens, positions, attention_mask):
        mean_so_far = self.embed(tokens).cumsum(1) / (positions.unsqueeze(-1) + 1)
        h = mean_so_far + 0.1 * positions[..., None]
        return self.out(torch.tanh(h))


def test_batched_greedy_generation_matches_one_prompt_at_a_time():
    model, eos, vocab, max_length = _ToyLM(), 11, 12, 14
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 10, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 6, (20,), generator=g)]
    fast = probes.greedy_generate(model, prompts, eos_id=eos, vocab_size=vocab,
                                  max_length=max_length)
    for prompt, got in zip(prompts, fast, strict=True):
        ids = list(prompt)
        while len(ids) < max_length:
            with torch.no_grad():
                logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], None)
            next_id = int(logits[0, -1, :vocab].argmax())
            if next_id == eos:
                break
            ids.append(next_id)
        assert got == ids[len(prompt):]
    # some stopped at EOS, so both ways of ending are covered
    assert any(len(p) + len(f) < max_length for p, f in zip(prompts, fast, strict=True))


@pytest.mark.slow
def test_the_study_runs_and_its_probes_agree_with_the_trainer(tmp_path):
    """A two-run miniature of the study end to end (warm-up, DPO, AdaDPO, report); the
    probe's float64 held-out log-probs match the trainer's own evaluation."""
    result = subprocess.run(
        [sys.executable, "examples/reproduction/reproduce.py", "--quick", "--steps", "6",
         "--sft-steps", "20", "--out", str(tmp_path / "out"), "--report-dir",
         str(tmp_path / "report")],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "out" / "records").glob("*.json")]
    assert sorted(r["run"]["method"] for r in records) == ["adadpo", "dpo"]
    for record in records:
        final = record["history"][-1]
        sums = torch.tensor(record["after"]["logps_sum"])
        assert final["eval/logps/chosen"] == pytest.approx(sums[:, 0].mean().item(), rel=1e-4)
        assert final["eval/logps/rejected"] == pytest.approx(sums[:, 1].mean().item(), rel=1e-4)
        start = torch.tensor(record["before"]["logps_sum"])
        initial = record["initial_eval"]
        assert initial["eval/logps/chosen"] == pytest.approx(start[:, 0].mean().item(), rel=1e-4)
    report = (tmp_path / "report" / "results.md").read_text()
    assert "AdaDPO (C=2)" in report and "DPO" in report
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["claims"]["pairs"]["count"] == 1
    for name in ("logps_over_training", "coefficient", "gradient_balance",
                 "generation_length", "variants"):
        assert (tmp_path / "report" / "figures" / f"{name}.png").stat().st_size > 1000
