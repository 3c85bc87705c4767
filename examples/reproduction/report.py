"""Tables, figures and a machine-readable summary from the reproduction's run records.

    python examples/reproduction/report.py runs/reproduction/records   # rewrite the report

Writes into the report directory: results.md (the tables and the claim checks, every number
computed here from the records), summary.json (the same numbers), and figures/*.png.
Records come from ``reproduce.py``; see its docstring for what a record holds.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

Record = Dict
GroupKey = Tuple[str, float, float]  # (method, lr, beta)
LABELS = {"dpo": "DPO", "adadpo": "AdaDPO (C=2)", "adadpo-C1.5": "AdaDPO C=1.5",
          "adadpo-C5": "AdaDPO C=5", "adadpo-ratio-space": "AdaDPO ratio space",
          "adadpo-sum": "AdaDPO sum reduction"}
COLORS = {"dpo": "tab:red", "adadpo": "tab:blue", "adadpo-C1.5": "tab:cyan",
          "adadpo-C5": "tab:purple", "adadpo-ratio-space": "tab:green",
          "adadpo-sum": "tab:orange"}
VARIANT_ORDER = ("dpo", "adadpo-C1.5", "adadpo", "adadpo-C5", "adadpo-ratio-space",
                 "adadpo-sum")


# --------------------------------------------------------------------------- per-run numbers

def evaluations(record: Record) -> List[Tuple[int, Dict[str, float]]]:
    """(optimizer updates done, held-out metrics), from before training to the end."""
    out = [(0, record["initial_eval"])]
    out += [(row["step"] + 1, row) for row in record["history"] if "eval/loss" in row]
    return out


def _final(record: Record, name: str) -> float:
    return evaluations(record)[-1][1][f"eval/{name}"]


def _change(record: Record, name: str) -> float:
    return _final(record, name) - record["initial_eval"][f"eval/{name}"]


def _finite(logs: Sequence[float]) -> List[float]:
    """The measurable pairs (a saturated loss has no gradient to compare: NaN)."""
    return [x for x in logs if math.isfinite(x)]


def _median_ratio(logs: Sequence[float]) -> float:
    return math.exp(statistics.median(_finite(logs)))


def _within(logs: Sequence[float], tolerance: float = 0.1) -> float:
    """Share of the measurable pairs whose gradient ratio is within ``tolerance`` of 1."""
    finite = _finite(logs)
    return sum(abs(math.exp(x) - 1) <= tolerance for x in finite) / len(finite)


def run_numbers(record: Record) -> Dict[str, float]:
    """Every per-run quantity the tables use (held-out pairs unless named "train")."""
    after, before = record["after"], record["before"]
    train_clip = [row["adadpo/clip_fraction"] for row in record["history"]]
    return {
        "chosen_sum_change": _change(record, "logps/chosen"),
        "chosen_token_change": _change(record, "logps_mean/chosen"),
        "rejected_sum_change": _change(record, "logps/rejected"),
        "rejected_token_change": _change(record, "logps_mean/rejected"),
        "margin": _final(record, "rewards/margins"),
        "accuracy": _final(record, "rewards/accuracies"),
        "coefficient_mean": statistics.fmean(after["coefficient"]),
        "clip_fraction": statistics.fmean(after["clipped"]),
        "train_clip_fraction": statistics.fmean(train_clip),
        "token_balance_median": _median_ratio(after["log_balance_token"]),
        "token_balance_within_10pct": _within(after["log_balance_token"]),
        "sequence_balance_median_log10": statistics.median(
            _finite(after["log_balance_sequence"])) / math.log(10),
        "saturated_pairs": sum(not math.isfinite(x) for x in after["log_balance_token"]),
        "token_balance_median_before": _median_ratio(before["log_balance_token"]),
        "generation_length": after["generation"]["mean_length"],
        "no_eos_fraction": after["generation"]["no_eos_fraction"],
        "exact_match": after["generation"]["exact_match"],
        "seconds": record["seconds"],
    }


# --------------------------------------------------------------------------- aggregation

def group(records: Iterable[Record]) -> Dict[GroupKey, List[Record]]:
    groups: Dict[GroupKey, List[Record]] = defaultdict(list)
    for record in records:
        run = record["run"]
        groups[(run["method"], run["lr"], run["beta"])].append(record)
    return dict(sorted(groups.items(), key=lambda item: (item[0][1], item[0][2], item[0][0])))


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(records: List[Record]) -> Dict[str, Dict[str, Tuple[float, float]]]:
    numbers = [run_numbers(r) for r in records]
    return {name: mean_std([n[name] for n in numbers]) for name in numbers[0]}


def _cell(value: Tuple[float, float], digits: int = 2, percent: bool = False) -> str:
    mean, std = value
    if percent:
        return f"{100 * mean:.0f}% ± {100 * std:.0f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


LOGP_COLUMNS = (("chosen_sum_change", "Δ chosen logp (sum)", 2, False),
                ("chosen_token_change", "Δ chosen logp (per token)", 3, False),
                ("rejected_sum_change", "Δ rejected logp (sum)", 2, False),
                ("rejected_token_change", "Δ rejected logp (per token)", 3, False),
                ("margin", "reward margin", 2, False),
                ("accuracy", "held-out accuracy", 2, False))
MECHANISM_COLUMNS = (("coefficient_mean", "coef mean", 2, False),
                     ("clip_fraction", "clipped (held-out)", 0, True),
                     ("train_clip_fraction", "clipped (training)", 0, True),
                     ("token_balance_median", "per-token grad ratio w/l (median)", 3, False),
                     ("token_balance_within_10pct", "pairs balanced ±10%", 0, True),
                     ("sequence_balance_median_log10", "log10 seq. grad ratio (median)", 2,
                      False),
                     ("generation_length", "greedy length", 2, False),
                     ("no_eos_fraction", "no EOS", 0, True),
                     ("exact_match", "exact match", 2, False))


def _rows(groups, columns, keys):
    for key in keys:
        method, lr, beta = key
        stats = aggregate(groups[key])
        yield [f"{lr:g}", f"{beta:g}", LABELS[method]] + [
            _cell(stats[name], digits, percent) for name, _, digits, percent in columns]


# --------------------------------------------------------------------------- claims

def _paired(groups, method_a: str, method_b: str):
    """(run of a, run of b) with the same lr, beta and seed."""
    by_seed = {}
    for (method, lr, beta), records in groups.items():
        for r in records:
            by_seed[(method, lr, beta, r["run"]["seed"])] = r
    for (method, lr, beta, seed), r in sorted(by_seed.items()):
        if method == method_a and (method_b, lr, beta, seed) in by_seed:
            yield r, by_seed[(method_b, lr, beta, seed)]


def claims(groups) -> Dict[str, Dict[str, float]]:
    """The paper's three claims, counted over paired runs (same lr, beta, seed)."""
    pairs = list(_paired(groups, "adadpo", "dpo"))
    n = [(run_numbers(a), run_numbers(d)) for a, d in pairs]

    def count(test: Callable) -> int:
        return sum(bool(test(a, d)) for a, d in n)

    dpo_runs = [r for key, rs in groups.items() if key[0] == "dpo" for r in rs]
    ada_runs = [r for key, rs in groups.items() if key[0] == "adadpo" for r in rs]
    return {
        "pairs": {"count": len(n)},
        "chosen_up": {
            "adadpo_runs_chosen_token_up": sum(run_numbers(r)["chosen_token_change"] > 0
                                               for r in ada_runs),
            "dpo_runs_chosen_token_up": sum(run_numbers(r)["chosen_token_change"] > 0
                                            for r in dpo_runs),
            "adadpo_chosen_token_higher_than_dpo": count(
                lambda a, d: a["chosen_token_change"] > d["chosen_token_change"]),
            "adadpo_chosen_share_of_margin_larger": count(
                lambda a, d: _chosen_share(a) > _chosen_share(d)),
        },
        "balance": {
            "adadpo_closer_to_1": count(
                lambda a, d: abs(math.log(a["token_balance_median"]))
                < abs(math.log(d["token_balance_median"]))),
            "adadpo_median_ratio": statistics.median(a["token_balance_median"] for a, _ in n),
            "dpo_median_ratio": statistics.median(d["token_balance_median"] for _, d in n),
        },
        "length": {
            "adadpo_shorter": count(lambda a, d: a["generation_length"] < d["generation_length"]),
            "adadpo_mean_length": statistics.fmean(a["generation_length"] for a, _ in n),
            "dpo_mean_length": statistics.fmean(d["generation_length"] for _, d in n),
        },
        "accuracy": {
            "adadpo_higher_or_equal": count(lambda a, d: a["accuracy"] >= d["accuracy"]),
            "adadpo_exact_match_higher": count(lambda a, d: a["exact_match"] > d["exact_match"]),
        },
    }


def _chosen_share(numbers: Dict[str, float]) -> float:
    """How much of the per-token log-prob gap's growth came from the chosen side:
    Δchosen / (Δchosen - Δrejected); 1 = all from pushing y_w up, 0 = all from y_l down."""
    up, down = numbers["chosen_token_change"], numbers["rejected_token_change"]
    return up / (up - down) if up != down else 0.0


# --------------------------------------------------------------------------- figures

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: List[Record], name: str):
    steps = [s for s, _ in evaluations(records[0])]
    values = [[row[f"eval/{name}"] for _, row in evaluations(r)] for r in records]
    columns = list(zip(*values, strict=True))
    return steps, [statistics.fmean(c) for c in columns], [min(c) for c in columns], \
        [max(c) for c in columns]


def figure_logps(groups, out: Path) -> Path:
    """Held-out per-token chosen and rejected log-probs over training, one panel per setting."""
    plt = _plt()
    settings = sorted({(lr, beta) for method, lr, beta in groups if method in ("dpo", "adadpo")})
    lrs = sorted({lr for lr, _ in settings})
    betas = sorted({beta for _, beta in settings})
    fig, axes = plt.subplots(len(betas), len(lrs), figsize=(4 * len(lrs), 3.2 * len(betas)),
                             squeeze=False, sharey=True)
    for (lr, beta) in settings:
        ax = axes[betas.index(beta)][lrs.index(lr)]
        for method in ("dpo", "adadpo"):
            if (method, lr, beta) not in groups:
                continue
            for name, style in (("logps_mean/chosen", "-"), ("logps_mean/rejected", "--")):
                steps, mean, low, high = _series(groups[(method, lr, beta)], name)
                side = name.split("/")[1]
                ax.plot(steps, mean, style, color=COLORS[method], label=f"{LABELS[method]} {side}")
                ax.fill_between(steps, low, high, color=COLORS[method], alpha=0.15)
        ax.set_title(f"lr {lr:g}, beta {beta:g}")
        ax.set_xlabel("optimizer steps")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("held-out log-prob per token")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Chosen (solid) and rejected (dashed) log-probs; mean and range over seeds")
    fig.tight_layout()
    return _save(fig, out / "logps_over_training.png")


def figure_coefficient(groups, variant_key, out: Path) -> Path:
    """Left: the held-out per-pair ratio k r (before the clip), before and after training.
    Right: the clipped share of training pairs per step, AdaDPO C = 2, every setting."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    _, lr, beta = variant_key
    series = [("warm-up model (start)", "black", _dpo_record(groups)["before"]["log_ratio"])]
    series += [(f"after {LABELS[m]}", COLORS[m],
                [x for r in groups.get((m, lr, beta), []) for x in r["after"]["log_ratio"]])
               for m in ("dpo", "adadpo")]
    bins = _bins([x for _, _, logs in series for x in logs], 0.25)
    for label, color, logs in series:
        if logs:
            left.hist(logs, bins=bins, histtype="step", color=color, label=label,
                      weights=[1 / len(logs)] * len(logs))
    left.axvline(math.log(2.0), color="gray", linestyle=":", label="log C (C = 2)")
    left.set_xlabel("log r = m_w - m_l (held-out pairs, seeds pooled)")
    left.set_ylabel("share of pairs")
    left.set_title(f"Unclipped coefficient, lr {lr:g}, beta {beta:g}")
    left.legend(fontsize=7)
    for (method, glr, gbeta), records in groups.items():
        if method != "adadpo":
            continue
        steps = [row["step"] + 1 for row in records[0]["history"]]
        clip = [statistics.fmean(r["history"][i]["adadpo/clip_fraction"] for r in records)
                for i in range(len(steps))]
        right.plot(steps, _smooth(clip), label=f"lr {glr:g}, beta {gbeta:g}")
    right.set_xlabel("optimizer steps")
    right.set_ylabel("clipped share of pairs (training, smoothed)")
    right.set_title("AdaDPO (C = 2): clip fraction during training")
    right.set_ylim(0, 1)
    right.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out / "coefficient.png")


def _bins(values: Sequence[float], width: float) -> List[float]:
    low, high = math.floor(min(values) / width), math.ceil(max(values) / width)
    return [i * width for i in range(low, high + 2)]


def _dpo_record(groups) -> Record:
    """A DPO run: its "before" measurements are those of the warm-up model under DPO."""
    return next(rs[0] for key, rs in groups.items() if key[0] == "dpo")


def _smooth(values: List[float], window: int = 10) -> List[float]:
    return [statistics.fmean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]


def figure_balance(groups, variant_key, out: Path) -> Path:
    """The measured per-token gradient ratio |dL/dp| on y_w over y_l, per held-out pair."""
    plt = _plt()
    _, lr, beta = variant_key
    fig, ax = plt.subplots(figsize=(7, 3.8))
    series = [(LABELS[m], COLORS[m], "-",
               [x / math.log(10) for r in groups[(m, lr, beta)]
                for x in _finite(r["after"]["log_balance_token"])])
              for m in VARIANT_ORDER if (m, lr, beta) in groups]
    start = _dpo_record(groups)["before"]["log_balance_token"]
    series.append(("DPO at the start", "gray", ":",
                   [x / math.log(10) for x in _finite(start)]))
    bins = _bins([x for *_, logs in series for x in logs], 0.1)
    for label, color, style, logs in series:
        ax.hist(logs, bins=bins, histtype="step", color=color, linestyle=style, label=label,
                weights=[1 / len(logs)] * len(logs))
    ax.axvline(0.0, color="black", linewidth=0.8)
    return _finish(fig, ax, out / "gradient_balance.png",
                   xlabel="log10 per-token gradient ratio, chosen / rejected (0 = balanced)",
                   ylabel="share of held-out pairs (seeds pooled)",
                   title=f"Measured gradient balance after training, lr {lr:g}, beta {beta:g}")


def figure_lengths(groups, out: Path) -> Path:
    """Mean greedy generation length on held-out prompts, DPO and AdaDPO, per setting."""
    plt = _plt()
    keys = [(lr, beta) for method, lr, beta in groups if method == "dpo"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.38
    for offset, method in ((-width / 2, "dpo"), (width / 2, "adadpo")):
        means, errs = [], []
        for lr, beta in keys:
            lengths = [r["after"]["generation"]["mean_length"]
                       for r in groups.get((method, lr, beta), [])]
            mean, std = mean_std(lengths) if lengths else (float("nan"), 0.0)
            means.append(mean)
            errs.append(std)
        ax.bar([i + offset for i in range(len(keys))], means, width, yerr=errs,
               color=COLORS[method], label=LABELS[method])
    start = _dpo_record(groups)["before"]["generation"]
    ax.axhline(start["mean_length"], color="black", linestyle=":", label="warm-up model")
    ax.axhline(start["mean_chosen_length"], color="gray", linestyle="--",
               label="chosen responses")
    ax.set_xticks(range(len(keys)), [f"lr {lr:g}\nbeta {beta:g}" for lr, beta in keys])
    return _finish(fig, ax, out / "generation_length.png",
                   ylabel="mean greedy length (tokens)",
                   title="Greedy generations on held-out prompts (mean ± std over seeds)")


def figure_variants(groups, variant_key, out: Path) -> Path:
    """Per-token held-out log-prob changes of chosen and rejected for DPO and the variants."""
    plt = _plt()
    _, lr, beta = variant_key
    methods = [m for m in VARIANT_ORDER if (m, lr, beta) in groups]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.38
    for offset, name, label in ((-width / 2, "chosen_token_change", "chosen"),
                                (width / 2, "rejected_token_change", "rejected")):
        stats = [aggregate(groups[(m, lr, beta)])[name] for m in methods]
        ax.bar([i + offset for i in range(len(methods))], [s[0] for s in stats], width,
               yerr=[s[1] for s in stats], label=label,
               color="tab:blue" if label == "chosen" else "tab:red")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(methods)), [LABELS[m].replace("AdaDPO ", "AdaDPO\n")
                                        for m in methods])
    return _finish(fig, ax, out / "variants.png", ylabel="Δ held-out log-prob per token",
                   title=f"Variants at lr {lr:g}, beta {beta:g} (mean ± std over seeds)")


def _finish(fig, ax, path: Path, *, ylabel: str, title: str, xlabel: str = "") -> Path:
    """Labels, legend and layout of a one-panel figure, then saves it."""
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


# --------------------------------------------------------------------------- the report

def write(records: List[Record], report_dir: Path, *, variant_setting: Tuple[float, float],
          command: str) -> Path:
    report_dir = Path(report_dir)
    groups = group(records)
    variant_key = ("adadpo", *variant_setting)
    grid_keys = [k for k in groups if k[0] in ("dpo", "adadpo")]
    variant_keys = [(m, *variant_setting) for m in VARIANT_ORDER
                    if (m, *variant_setting) in groups]
    figures = [figure_logps(groups, report_dir / "figures"),
               figure_coefficient(groups, variant_key, report_dir / "figures"),
               figure_balance(groups, variant_key, report_dir / "figures"),
               figure_lengths(groups, report_dir / "figures"),
               figure_variants(groups, variant_key, report_dir / "figures")]
    found = claims(groups)
    start = records[0]["before"]["generation"]
    head = ["lr", "beta", "method"]
    seeds = sorted({r["run"]["seed"] for r in records})
    text = [
        "# Reproduction results (generated by report.py; do not edit by hand)",
        "",
        f"Command: `{command}`  ",
        f"{len(records)} runs, {records[0]['run']['steps']} preference steps each, seeds "
        f"{seeds}; {sum(r['seconds'] for r in records) / 60:.1f} run-minutes on "
        f"{platform.machine()} ({platform.python_version()}). Means ± standard deviations "
        "over seeds; changes are from the warm-up model (step 0) to the end, on the "
        f"{len(records[0]['after']['coefficient'])} held-out pairs.",
        f"Pairs whose loss saturated (no gradient left to compare; left out of the ratios): "
        f"{sum(run_numbers(r)['saturated_pairs'] for r in records):g} of "
        f"{sum(len(r['after']['coefficient']) for r in records)} pair measurements.",
        "",
        f"Warm-up model on the held-out prompts: greedy length {start['mean_length']:.2f} "
        f"tokens (chosen responses: {start['mean_chosen_length']:.2f}), exact match "
        f"{start['exact_match']:.2f}, no EOS {100 * start['no_eos_fraction']:.0f}%.",
        "",
        "## Log-probabilities and rewards (grid)",
        "",
        _table(head + [c[1] for c in LOGP_COLUMNS], _rows(groups, LOGP_COLUMNS, grid_keys)),
        "",
        "## Coefficient, measured gradient balance and generations (grid)",
        "",
        _table(head + [c[1] for c in MECHANISM_COLUMNS],
               _rows(groups, MECHANISM_COLUMNS, grid_keys)),
        "",
        "For DPO rows, \"coef mean\" and \"clipped (held-out)\" are what AdaDPO (C = 2) "
        "would use on the same pairs; DPO itself scales nothing. The gradient ratios are "
        "measured with autograd on the held-out pairs after training (probes.py): per token, "
        "the geometric mean of |dL/dp_t| over y_w's tokens over the same over y_l's "
        "(1 = balanced); per sequence, |dL/dP_w| / |dL/dP_l|.",
        "",
        f"## Variants at lr {variant_setting[0]:g}, beta {variant_setting[1]:g}",
        "",
        _table(head + [c[1] for c in LOGP_COLUMNS], _rows(groups, LOGP_COLUMNS, variant_keys)),
        "",
        _table(head + [c[1] for c in MECHANISM_COLUMNS],
               _rows(groups, MECHANISM_COLUMNS, variant_keys)),
        "",
        "## The paper's claims, counted over paired runs (same lr, beta, seed)",
        "",
        "```json",
        json.dumps(found, indent=2),
        "```",
        "",
        "## Figures",
        "",
        *[f"![{path.stem}](figures/{path.name})" for path in figures],
        "",
    ]
    (report_dir / "results.md").write_text("\n".join(text))
    summary = {"command": command, "claims": found,
               "groups": {f"{m} lr={lr:g} beta={b:g}": aggregate(rs)
                          for (m, lr, b), rs in groups.items()}}
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {report_dir / 'results.md'}, summary.json and {len(figures)} figures")
    return report_dir / "results.md"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", type=Path, help="the records directory of a study")
    parser.add_argument("--report-dir", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    from reproduce import VARIANT_SETTING

    records = [json.loads(p.read_text()) for p in sorted(args.records.glob("*.json"))]
    if not records:
        raise FileNotFoundError(f"{args.records}: no run records (*.json)")
    write(records, args.report_dir, variant_setting=VARIANT_SETTING,
          command=f"python examples/reproduction/report.py {args.records}")


if __name__ == "__main__":
    main()
