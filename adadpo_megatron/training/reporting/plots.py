"""adadpo-plot: PNG plots from a run's metrics.jsonl.

    adadpo-plot runs/tiny_cpu                 # writes runs/tiny_cpu/plots/*.png
    adadpo-plot runs/tiny_cpu/metrics.jsonl --out figures/

One figure per panel: loss; rewards (chosen, rejected, margin); reward accuracy; the AdaDPO
coefficient (mean and max) with the clip fraction. Held-out ("eval/") series, when the run
evaluated, are drawn as dots on the same axes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Sequence

PANELS = {
    "loss": (("loss",), "loss"),
    "rewards": (("rewards/chosen", "rewards/rejected", "rewards/margins"), "reward"),
    "accuracy": (("rewards/accuracies",), "reward accuracy"),
    "coefficient": (("adadpo/coef_mean", "adadpo/coef_max", "adadpo/clip_fraction"),
                    "AdaDPO coefficient / clip fraction"),
}


def read_metrics(path: Path) -> List[Dict[str, float]]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON: {err.msg}") from err
    if not rows:
        raise ValueError(f"{path} has no steps")
    return rows


def read_metrics_or_exit(parser: argparse.ArgumentParser, run: Path) -> List[Dict[str, float]]:
    """read_metrics for a command: a missing or broken file exits 2 with the reason."""
    try:
        return read_metrics(run)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


def plot(rows: List[Dict[str, float]], out_dir: Path) -> List[Path]:
    import matplotlib  # seconds to import: adadpo-plot's alone

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (keys, ylabel) in PANELS.items():
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
        for key in keys:
            steps = [r["step"] for r in rows if key in r]
            if steps:
                line, = ax.plot(steps, [r[key] for r in rows if key in r], label=key)
                held = [r for r in rows if f"eval/{key}" in r]
                if held:
                    ax.plot([r["step"] for r in held], [r[f"eval/{key}"] for r in held], "o",
                            color=line.get_color(), label=f"eval/{key}")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="adadpo-plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory or its metrics.jsonl")
    parser.add_argument("--out", help="where the PNGs go (default: RUN/plots)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    rows = read_metrics_or_exit(parser, run)
    out = Path(args.out) if args.out else (run if run.is_dir() else run.parent) / "plots"
    for path in plot(rows, out):
        print(path)


if __name__ == "__main__":
    main()
