"""adadpo-summary: a run's outcome as a table, from its metrics.jsonl.

    adadpo-summary runs/demo/adadpo [--min-eval-accuracy 0.75]

Prints (and writes to RUN/summary.md) the held-out metrics at the first and the last
evaluation, the last training step's metrics and the run's length. With
--min-eval-accuracy, exits 1 when the last held-out reward accuracy is below it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Sequence

from adadpo_megatron.training.reporting.plots import read_metrics_or_exit

ROWS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
        "logps_mean/chosen", "logps_mean/rejected", "adadpo/coef_mean", "adadpo/clip_fraction")


def summary_table(rows: List[Dict[str, float]]) -> str:
    evaluated = [r for r in rows if "eval/loss" in r]
    last = rows[-1]
    header = ["metric", "train (last step)"]
    if evaluated:
        header += [f"held-out, step {evaluated[0]['step']}",
                   f"held-out, step {evaluated[-1]['step']}"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name in ROWS:
        if name not in last:
            continue
        cells = [name, f"{last[name]:.4f}"]
        if evaluated:
            cells += [f"{evaluated[0].get('eval/' + name, float('nan')):.4f}",
                      f"{evaluated[-1].get('eval/' + name, float('nan')):.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    steps = f"{len(rows)} steps, {sum(r.get('step_time', 0.0) for r in rows):.0f} s of steps"
    return "\n".join(lines) + f"\n\n{steps}\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="adadpo-summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory or its metrics.jsonl")
    parser.add_argument("--min-eval-accuracy", type=float, default=None)
    args = parser.parse_args(argv)
    run = Path(args.run)
    rows = read_metrics_or_exit(parser, run)
    table = summary_table(rows)
    print(table)
    (run if run.is_dir() else run.parent).joinpath("summary.md").write_text(table)
    if args.min_eval_accuracy is not None:
        evaluated = [r for r in rows if "eval/rewards/accuracies" in r]
        if not evaluated:
            parser.exit(1, "adadpo-summary: the run has no held-out evaluation\n")
        accuracy = evaluated[-1]["eval/rewards/accuracies"]
        if accuracy < args.min_eval_accuracy:
            parser.exit(1, f"adadpo-summary: held-out reward accuracy {accuracy:.3f} is below "
                           f"{args.min_eval_accuracy}\n")
        print(f"held-out reward accuracy {accuracy:.3f} >= {args.min_eval_accuracy}")


if __name__ == "__main__":
    main()
