"""Reference log-probs: precompute equals resident, on any layout; stale caches are refused."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from adadpo_megatron.data.preference_data import load_preference_data
from adadpo_megatron.data.tokenizers import ByteTokenizer
from adadpo_megatron.training.reference_cache import load_cache, reference_fingerprint, save_cache
from tests.support.distributed import run_distributed
from tests.support.tolerances import U, dpo_loss_gap, logp_sum_gap
from tests.support.training import DATA, run_steps, tiny_config, tiny_depth, tiny_training_gaps


def _cached_gaps(history, seq_length=24):
    """tolerances.py's bounds for a run against the same run with its reference sums read
    from a cache: the two layouts' bounds (tiny_training_gaps), but at step 0 the cached sums
    may round apart from the policy's (another batch), so z is off by beta (C + 1) times a
    sum's gap and the loss from ln 2 by half that (|d loss / dz| = 1/2 at z = 0)."""
    gaps, weights = tiny_training_gaps(history, seq_length)
    sums = {side: logp_sum_gap(history[0][f"logps/{side}"], seq_length, tiny_depth(seq_length))
            for side in ("chosen", "rejected")}
    gaps[0]["loss"] = dpo_loss_gap(0.5, sums["chosen"], sums["rejected"], reference=False,
                                   clip=2.0, loss=math.log(2.0), log_ratio=0.0)
    return gaps, weights


def _small_data(path, rows=40):
    path.write_text("\n".join(DATA.read_text().splitlines()[:rows]) + "\n")
    return str(path)


def _precompute_worker(rank, world, data, cache, overrides):
    from adadpo_megatron.training.precompute import precompute_reference

    # padded rows, as the training below runs them (precompute plans as data.packing says)
    precompute_reference(tiny_config({"data.path": data, "reference.mode": "precompute",
                                      "reference.cache_path": cache, "data.packing": "none",
                                      **overrides}))


def _train_worker(rank, world, data, cache, mode, out, overrides=None):
    # padded rows on both sides, as the precompute above runs them, so that the cached sums
    # and the resident reference's are the same computation; packed training from a cache is
    # tests/training/test_packing_training.py's
    config = tiny_config({"data.path": data, "reference.mode": mode,
                          "reference.cache_path": cache, "data.packing": "none",
                          **(overrides or {})})
    history, params = run_steps(config, steps=2)
    if rank == 0:
        torch.save({"history": history, "params": params}, out)


@pytest.fixture(scope="module")
def precomputed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    data = _small_data(tmp / "pairs.jsonl")
    cache = str(tmp / "pairs.reference.pt")
    run_distributed(_precompute_worker, 1, data, cache, {})
    return tmp, data, cache


@pytest.mark.slow
def test_precompute_and_resident_train_identically(precomputed):
    tmp, data, cache = precomputed
    results = {}
    for mode in ("precompute", "resident"):
        out = str(tmp / f"{mode}.pt")
        run_distributed(_train_worker, 1, data, cache, mode, out)
        results[mode] = torch.load(out, weights_only=False)
    pre, res = results["precompute"], results["resident"]
    # the cache's sums and the resident reference's run on the same padded rows; where their
    # rounding differs, within the bounds of two layouts (tests/support/tolerances.py)
    gaps, weights = _cached_gaps(res["history"])
    assert pre["history"][0]["loss"] == pytest.approx(math.log(2.0), abs=gaps[0]["loss"])
    for a, b, bound in zip(pre["history"], res["history"], gaps, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=bound["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=bound["grad_norm"])
    for name, value in res["params"].items():
        torch.testing.assert_close(pre["params"][name], value, rtol=2 * U, atol=weights)


def _checkpoint_worker(rank, world, data, out):
    from adadpo_megatron.training.trainer import Trainer

    trainer = Trainer(tiny_config({"data.path": data, "train.output_dir": out,
                                   "train.max_steps": 2, "train.progress": False,
                                   "train.tensorboard": False})).setup()
    try:
        trainer.train()
    finally:
        trainer.close()


def _train_from_worker(rank, world, data, cache, mode, load, out):
    config = tiny_config({"data.path": data, "reference.mode": mode,
                          "reference.cache_path": cache, "model.load": load})
    history, _ = run_steps(config, steps=2)
    if rank == 0:
        torch.save(history, out)


@pytest.mark.slow
def test_precompute_uses_the_loaded_weights(tmp_path):
    """With model.load (the usual start: a warm-up checkpoint) the precomputed reference is
    that checkpoint, as the resident one is: step 0 is ln 2 and both modes train alike."""
    data = _small_data(tmp_path / "pairs.jsonl")
    start = str(tmp_path / "start")
    run_distributed(_checkpoint_worker, 1, data, start)
    cache = str(tmp_path / "pairs.reference.pt")
    run_distributed(_precompute_worker, 1, data, cache, {"model.load": start})
    histories = {}
    for mode in ("precompute", "resident"):
        out = str(tmp_path / f"{mode}.pt")
        run_distributed(_train_from_worker, 1, data, cache, mode, start, out)
        histories[mode] = torch.load(out, weights_only=False)
    # packed training against a cache of padded rows: the sums round apart (seq 24)
    gaps, _ = _cached_gaps(histories["resident"])
    assert histories["precompute"][0]["loss"] == pytest.approx(math.log(2.0),
                                                               abs=gaps[0]["loss"])
    for a, b, bound in zip(histories["precompute"], histories["resident"], gaps, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=bound["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"parallel.tensor_model_parallel_size": 2},
                                    {"parallel.pipeline_model_parallel_size": 2},
                                    {"train.micro_batch_size": 1}],
                         ids=["tp2", "pp2", "dp2_mbs1"])
def test_precompute_on_two_ranks_matches_one(precomputed, tmp_path, layout):
    _, data, cache = precomputed
    other = str(tmp_path / "other.pt")
    run_distributed(_precompute_worker, 2, data, other, layout)
    one, two = torch.load(cache), torch.load(other)
    assert one["fingerprint"] == two["fingerprint"]
    torch.testing.assert_close(two["counts"], one["counts"], rtol=0, atol=0)  # integers
    # each a sum of <= 24 token log-probs: logp_sum_gap, relative to its size
    torch.testing.assert_close(two["logps"], one["logps"], rtol=logp_sum_gap(1.0, 24, tiny_depth()),
                               atol=0)
    assert (one["logps"] < 0).all()


def test_stale_cache_is_refused(tmp_path):
    data = tmp_path / "pairs.jsonl"
    _small_data(data)
    tokenizer = ByteTokenizer()
    config = tiny_config({"data.path": str(data)})
    settings = config.data.settings()
    dataset, _ = load_preference_data(str(data), tokenizer, settings, cache=False)
    fingerprint = reference_fingerprint(config, tokenizer, dataset)
    counts = (dataset.labels != -100).sum(-1).float()
    cache = tmp_path / "cache.pt"
    save_cache(cache, fingerprint, dataset.example_ids, torch.zeros(len(dataset), 2), counts)
    torch.testing.assert_close(load_cache(cache, fingerprint, dataset)[dataset.example_ids],
                               torch.zeros(len(dataset), 2))

    other_truncation = tiny_config({"data.path": str(data), "data.seq_length": 20})
    with pytest.raises(ValueError, match="stale: its truncation fingerprint differs"):
        load_cache(cache, reference_fingerprint(other_truncation, tokenizer, dataset), dataset)
    other_model = tiny_config({"data.path": str(data), "model.hidden_size": 64})
    with pytest.raises(ValueError, match="reference_model fingerprint differs"):
        load_cache(cache, reference_fingerprint(other_model, tokenizer, dataset), dataset)
    other_seed = tiny_config({"data.path": str(data), "train.seed": 8})
    with pytest.raises(ValueError, match="reference_model"):
        load_cache(cache, reference_fingerprint(other_seed, tokenizer, dataset), dataset)

    rows = data.read_text().splitlines()
    row = json.loads(rows[3])
    rows[3] = json.dumps({**row, "chosen": row["chosen"] + "q"})
    data.write_text("\n".join(rows) + "\n")
    edited, _ = load_preference_data(str(data), tokenizer, settings, cache=False)
    with pytest.raises(ValueError, match="its data fingerprint differs"):
        load_cache(cache, reference_fingerprint(config, tokenizer, edited), edited)
    with pytest.raises(FileNotFoundError, match="run adadpo-precompute-reference"):
        load_cache(tmp_path / "missing.pt", fingerprint, dataset)

    # LD-DPO weights the reference's sums: a cache of another ld_alpha (or none) is stale
    ld = tiny_config({"data.path": str(data), "loss.ld_alpha": 0.5})
    ld_fingerprint = reference_fingerprint(ld, tokenizer, dataset)
    with pytest.raises(ValueError, match="its ld_alpha fingerprint differs"):
        load_cache(cache, ld_fingerprint, dataset)
    save_cache(cache, ld_fingerprint, dataset.example_ids, torch.zeros(len(dataset), 2), counts)
    with pytest.raises(ValueError, match="its ld_alpha fingerprint differs"):
        load_cache(cache, fingerprint, dataset)
    other_alpha = tiny_config({"data.path": str(data), "loss.ld_alpha": 0.25})
    with pytest.raises(ValueError, match="its ld_alpha fingerprint differs"):
        load_cache(cache, reference_fingerprint(other_alpha, tokenizer, dataset), dataset)


def test_corrupted_truncated_or_foreign_caches_are_refused_naming_the_file(tmp_path):
    data = tmp_path / "pairs.jsonl"
    _small_data(data)
    tokenizer = ByteTokenizer()
    config = tiny_config({"data.path": str(data)})
    dataset, _ = load_preference_data(str(data), tokenizer, config.data.settings(), cache=False)
    fingerprint = reference_fingerprint(config, tokenizer, dataset)
    counts = (dataset.labels != -100).sum(-1).float()
    cache = tmp_path / "cache.pt"
    save_cache(cache, fingerprint, dataset.example_ids, -torch.rand(len(dataset), 2), counts)
    good = cache.read_bytes()
    # one flipped bit in the stored log-probs (found by locating their bytes)
    logps = torch.load(cache, weights_only=True)["logps"].numpy().tobytes()
    at = good.index(logps[:64]) + 13
    cache.write_bytes(good[:at] + bytes([good[at] ^ 0x40]) + good[at + 1:])
    with pytest.raises(ValueError, match=f"reference cache {cache} is corrupted"):
        load_cache(cache, fingerprint, dataset)
    cache.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=f"reference cache {cache} cannot be read"):
        load_cache(cache, fingerprint, dataset)
    torch.save({"something": 1}, cache)
    with pytest.raises(ValueError, match=f"{cache} is not a reference cache"):
        load_cache(cache, fingerprint, dataset)
    # a cache missing a pair of the data (another data set's rows)
    save_cache(cache, fingerprint, dataset.example_ids[1:], torch.zeros(len(dataset) - 1, 2),
               counts[1:])
    row = int(dataset.example_ids[0])
    with pytest.raises(ValueError, match=f"row {row} is not in the cache"):
        load_cache(cache, fingerprint, dataset)


def test_reference_weights_are_fingerprinted_by_their_files_not_path(tmp_path):
    """Issue 13, defect 5: a checkpoint retrained in place keeps its path and metadata.json;
    the cache made from the old weights must be stale. Issue 23: the weights are identified
    without reading them (names, sizes, modification times, metadata), and the digest is no
    longer remembered inside the user's directory."""
    data = tmp_path / "pairs.jsonl"
    _small_data(data)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (ckpt / "__0_0.distcp").write_bytes(b"weights one" * 100)
    tokenizer = ByteTokenizer()
    config = tiny_config({"data.path": str(data), "model.load": str(ckpt)})
    dataset, _ = load_preference_data(str(data), tokenizer, config.data.settings(), cache=False)
    before = reference_fingerprint(config, tokenizer, dataset)
    assert reference_fingerprint(config, tokenizer, dataset) == before  # stable
    written = (ckpt / "__0_0.distcp").stat().st_mtime_ns
    (ckpt / "__0_0.distcp").write_bytes(b"weights two" * 100)  # same size, same names
    # a retrain writes later than the first write; the clock the kernel stamps files with
    # can be coarser than the time between the two writes here, so say so explicitly
    os.utime(ckpt / "__0_0.distcp", ns=(written + 10**9, written + 10**9))
    after = reference_fingerprint(config, tokenizer, dataset)
    assert after["reference_model"] != before["reference_model"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["__0_0.distcp", "metadata.json"], \
        "nothing is written into the user's checkpoint directory"


def _skipped_row_data(path):
    """The first 200 shipped rows, row 5's rejected response equal to its chosen one (invalid:
    data.skip_invalid drops it, so positions and source rows part after row 5)."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:200]]
    rows[5]["rejected"] = rows[5]["chosen"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _skipped_train_worker(rank, world, data, cache, out, seed):
    overrides = {"data.path": data, "data.skip_invalid": True, "reference.mode": "precompute",
                 "reference.cache_path": cache, "train.seed": seed, "data.packing": "none"}
    from adadpo_megatron.training.precompute import precompute_reference

    precompute_reference(tiny_config(overrides))
    history, _ = run_steps(tiny_config(overrides), steps=1)
    if rank == 0:
        torch.save(history, out)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [7, 1])
def test_precomputed_reference_is_aligned_when_rows_are_skipped(tmp_path, seed):
    """Issue 13, defect 1: with a skipped row the cache was stored by position and read by
    source row: an IndexError (seed 7) or a step-0 loss off ln 2 (seed 1). The reference is
    the initial policy, so the step-0 loss is ln 2 exactly when every pair meets its own
    reference sums."""
    data = _skipped_row_data(tmp_path / "pairs.jsonl")
    out = tmp_path / "history.pt"
    run_distributed(_skipped_train_worker, 1, data, str(tmp_path / "ref.pt"), str(out), seed)
    history = torch.load(out, weights_only=False)
    bound = _cached_gaps(history)[0][0]["loss"]  # a misaligned cache is off by nats
    assert history[0]["loss"] == pytest.approx(math.log(2.0), abs=bound)


@pytest.mark.slow
def test_ld_dpo_precompute_and_resident_train_identically(tmp_path):
    """The precomputed reference sums carry LD-DPO's weighting, as the resident ones do."""
    data = _small_data(tmp_path / "pairs.jsonl")
    cache = str(tmp_path / "ld.reference.pt")
    ld = {"loss.ld_alpha": 0.5}
    run_distributed(_precompute_worker, 1, data, cache, ld)
    results = {}
    for mode in ("precompute", "resident"):
        out = str(tmp_path / f"{mode}.pt")
        run_distributed(_train_worker, 1, data, cache, mode, out, ld)
        results[mode] = torch.load(out, weights_only=False)
    gaps, _ = _cached_gaps(results["resident"]["history"])
    for a, b, bound in zip(results["precompute"]["history"], results["resident"]["history"],
                           gaps, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=bound["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=bound["grad_norm"])


def _stale_trainer_worker(rank, world, data, cache):
    from adadpo_megatron.training.trainer import Trainer

    config = tiny_config({"data.path": data, "reference.mode": "precompute",
                          "reference.cache_path": cache, "data.seq_length": 20})
    trainer = Trainer(config)
    with pytest.raises(ValueError, match="stale"):
        trainer.setup()
    assert trainer.model == [], "the model was built before the cache was checked"


@pytest.mark.slow
def test_trainer_refuses_a_stale_cache_before_building(precomputed):
    _, data, cache = precomputed
    run_distributed(_stale_trainer_worker, 1, data, cache)


def test_the_fingerprint_is_the_base_models_with_or_without_lora(tmp_path):
    """LoRA's adapters are off in the reference: a cache of the base serves any adapters on
    it (the LoRA settings are not part of the fingerprint), while the base's own weights
    (model.load's content) are."""
    data = tmp_path / "pairs.jsonl"
    _small_data(data)
    tokenizer = ByteTokenizer()
    base = tmp_path / "base"
    base.mkdir()
    (base / "metadata.json").write_text("{}")
    config = tiny_config({"data.path": str(data), "model.load": str(base)})
    dataset, _ = load_preference_data(str(data), tokenizer, config.data.settings(), cache=False)
    lora = tiny_config({"data.path": str(data), "model.load": str(base),
                        "model.lora": {"rank": 8}, "reference.mode": "precompute"})
    before = reference_fingerprint(lora, tokenizer, dataset)
    assert before == reference_fingerprint(config, tokenizer, dataset)
    (base / "metadata.json").write_text('{"another": "base"}')
    assert reference_fingerprint(lora, tokenizer, dataset)["reference_model"] != \
        before["reference_model"]
