"""The small-scale AdaDPO reproduction: DPO against AdaDPO from one warmed-up tiny GPT.

    python examples/reproduction/reproduce.py             # the study (about 25 min, 2 cores)
    python examples/reproduction/reproduce.py --quick     # 2 short runs: a smoke test

One supervised warm-up (configs/demo_sft.yaml, 600 steps instead of the demo's 150: the
chosen responses of the shipped reverse-a-word pairs; it gets about half of the held-out
words exactly right) is the starting point and the reference of every run. Then:
- the grid: DPO and AdaDPO (Stable, C = 2) x learning rates x betas x seeds;
- the variants, at one grid setting: AdaDPO with the ratio-space coefficient, with the
  sum reduction, and with C in {1.5, 5}.
Every run holds out the same 10% of pairs (data.eval_seed), which the warm-up never saw; the
seed changes the order of the training pairs. Each run's record (per-step metrics, held-out
evaluations, and the measurements of ``probes.py`` before and after training) goes to
<out>/records/<run>.json; a finished record is not run again. ``report.py`` then writes the
tables (results.md), the figures and summary.json into --report-dir.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import socket
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SFT_CONFIG = ROOT / "configs" / "demo_sft.yaml"
PREFERENCE_CONFIG = ROOT / "configs" / "demo_adadpo.yaml"
# the configs' data.path is relative to the working directory: found from anywhere
SHIPPED_DATA = f"data.path={ROOT / 'examples' / 'data' / 'reverse_pairs.jsonl'}"
EVAL_SEED = 1234  # the demo's split: the warm-up and every run hold out the same pairs

LEARNING_RATES = (1e-4, 3e-4, 1e-3)
BETAS = (0.1, 0.5)
SEEDS = (1, 2, 3)
VARIANT_SETTING = (1e-3, 0.1)  # (lr, beta) of the variant runs
VARIANTS: Dict[str, Tuple[str, ...]] = {
    "adadpo-ratio-space": ("loss.coefficient_space=ratio",),
    "adadpo-sum": ("loss.coefficient_reduction=sum",),
    "adadpo-C1.5": ("loss.clip=1.5",),
    "adadpo-C5": ("loss.clip=5.0",),
}
METHODS: Dict[str, Tuple[str, ...]] = {
    "dpo": ("loss.adaptive=false",),
    "adadpo": ("loss.adaptive=true", "loss.clip=2.0"),
    **{name: ("loss.adaptive=true",) + extra for name, extra in VARIANTS.items()},
}


# REPORT.md was measured on padded rows (0.1 had no packing); packing changes only the float
# rounding of the same gradients, but the study pins the layout it was written with.
PADDED = ["data.packing=none"]


@dataclass(frozen=True)
class Run:
    method: str
    lr: float
    beta: float
    seed: int
    steps: int

    @property
    def name(self) -> str:
        return f"{self.method}_lr{self.lr:g}_beta{self.beta:g}_seed{self.seed}"

    def overrides(self, sft: Path, out: Path) -> List[str]:
        """The run's config overrides."""
        return [*METHODS[self.method], f"loss.beta={self.beta}", f"optimizer.lr={self.lr}",
                f"optimizer.min_lr={self.lr / 10}", f"train.seed={self.seed}",
                f"train.max_steps={self.steps}", f"data.eval_seed={EVAL_SEED}",
                f"model.load={sft}", f"train.output_dir={out / 'runs' / self.name}",
                "train.resume=never", "train.progress=false", "train.tensorboard=false",
                "train.micro_batch_size=8", SHIPPED_DATA, *PADDED]


def plan(steps: int, quick: bool) -> List[Run]:
    if quick:
        return [Run(method, *VARIANT_SETTING, SEEDS[0], steps) for method in ("dpo", "adadpo")]
    grid = [Run(method, lr, beta, seed, steps) for lr in LEARNING_RATES for beta in BETAS
            for seed in SEEDS for method in ("dpo", "adadpo")]
    variants = [Run(method, *VARIANT_SETTING, seed, steps) for method in VARIANTS
                for seed in SEEDS]
    return grid + variants


# --------------------------------------------------------------------------- workers

def _start_worker() -> None:
    """Each worker is its own one-process world (gloo), one thread: two workers per 2 cores."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), PYTHONWARNINGS="ignore")
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))


def warm_up(out: Path, steps: int) -> Path:
    """The supervised warm-up, once; returns its output directory (its latest checkpoint)."""
    from adadpo_megatron.training import Trainer, latest_checkpoint, load_run_config

    sft = out / "sft"
    marker = sft / "warm_up.json"  # what the checkpoint was made with
    if latest_checkpoint(str(sft)) is not None:
        made = json.loads(marker.read_text()) if marker.is_file() else None
        if made != {"steps": steps}:
            raise ValueError(f"{sft} holds a warm-up made with {made}, not --sft-steps "
                             f"{steps}; pass another --out or delete it")
    else:
        config = load_run_config(str(SFT_CONFIG), [
            f"train.output_dir={sft}", f"data.eval_seed={EVAL_SEED}", "train.resume=never",
            "train.progress=false", "train.tensorboard=false", f"train.max_steps={steps}",
            "train.micro_batch_size=8", "train.eval_interval=200", SHIPPED_DATA, *PADDED])
        trainer = Trainer(config).setup()
        try:
            trainer.train()
        finally:
            trainer.close()
        marker.write_text(json.dumps({"steps": steps}))
    return sft


def _probe(model, held, reference_logps, trainer) -> Dict:
    """The measurements of ``model``, whose held-out log-probs are ``held``."""
    import probes

    c = trainer.config
    coefficient = probes.coefficients(held, reference_logps, c.loss)
    balance = probes.gradient_balance(held, reference_logps, c.loss)
    return {
        "logps_sum": held["sum"].tolist(),
        "count": held["count"].tolist(),
        "log_ratio": coefficient["log_ratio"].tolist(),
        "coefficient": coefficient["coefficient"].tolist(),
        "clipped": coefficient["clipped"].tolist(),
        "log_balance_token": balance["log_token"].tolist(),
        "log_balance_sequence": balance["log_sequence"].tolist(),
        "generation": probes.generation_report(model, trainer.run.data.eval_set,
                                               trainer.run.data.tokenizer, c.data.seq_length),
    }


def train_one(run: Run, sft: Path, out: Path) -> Dict:
    """Trains one run and measures it; writes and returns its record."""
    import probes

    from adadpo_megatron.training import Trainer, load_run_config

    record_path = out / "records" / f"{run.name}.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["run"] != asdict(run):
            raise ValueError(f"{record_path} was made by {record['run']}, not {asdict(run)}; "
                             "pass another --out or delete it")
        return record
    shutil.rmtree(out / "runs" / run.name, ignore_errors=True)
    start = time.perf_counter()
    config = load_run_config(str(PREFERENCE_CONFIG), run.overrides(sft, out))
    trainer = Trainer(config).setup()
    try:
        initial = trainer.evaluate()
        reference = trainer.reference_model[0]
        reference_logps = probes.pair_logps(reference, trainer.run.data.eval_set)
        before = _probe(reference, reference_logps, reference_logps, trainer)  # = the policy
        history = trainer.train()
        policy = trainer.model[0].module
        after = _probe(policy, probes.pair_logps(policy, trainer.run.data.eval_set),
                       reference_logps, trainer)
    finally:
        trainer.close()
    record = {"run": asdict(run), "name": run.name, "initial_eval": initial,
              "history": history, "before": before, "after": after,
              "seconds": time.perf_counter() - start}
    record_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(record_path)  # a killed run leaves no half record behind
    print(f"{run.name}: {record['seconds']:.0f} s, held-out accuracy "
          f"{history[-1].get('eval/rewards/accuracies', float('nan')):.2f}", flush=True)
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduction",
                        help="runs, checkpoints and per-run records")
    parser.add_argument("--report-dir", type=Path, default=HERE,
                        help="where results.md, summary.json and figures/ go")
    parser.add_argument("--steps", type=int, default=200, help="preference steps per run")
    parser.add_argument("--sft-steps", type=int, default=600)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="DPO and AdaDPO, one seed")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    runs = plan(args.steps, args.quick)
    start = time.perf_counter()
    # Not multiprocessing.Pool: its daemonic workers cannot start the helper process
    # megatron-core's checkpoint saving uses.
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start_worker) as pool:
        sft = pool.submit(warm_up, out, args.sft_steps).result()
        print(f"warm-up: {time.perf_counter() - start:.0f} s; {len(runs)} runs on "
              f"{args.workers} workers", flush=True)
        records = list(pool.map(train_one, runs, [sft] * len(runs), [out] * len(runs)))
    print(f"all runs: {time.perf_counter() - start:.0f} s", flush=True)

    sys.path.insert(0, str(HERE))
    import report

    report.write(records, args.report_dir, variant_setting=VARIANT_SETTING,
                 command=" ".join(["python examples/reproduction/reproduce.py",
                                   *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    main()
