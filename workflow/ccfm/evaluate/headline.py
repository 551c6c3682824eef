"""The lines a user reads at the end of a run: where the results are and CCFM beside the baselines.

``python -m ccfm.evaluate.headline results/demo/metrics_summary.tsv [--report results/report.html]``
prints, for each summary table, CCFM's, the additive baseline's and no-change's MSE, Pearson
delta, cell-eval DE overlap and cell-level energy distance (beside its real-vs-real floor) on
the held-out perturbations (all folds pooled), and names plainly every metric CCFM loses.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

HEADLINE_METHODS = ("ccfm", "additive", "nochange")
# metric column -> (printed name, format, higher is better); the energy distance's floor is
# printed beside it.
HEADLINE_METRICS = {
    "mse": ("MSE", ".4f", False),
    "pearson_delta_pseudobulk": ("Pearson delta", ".3f", True),
    "celleval_overlap_at_N": ("DE overlap", ".3f", True),
    "energy_distance": ("energy distance", ".3f", False),
    # DES, PDS and MAE scaled against the mean-perturbation baseline, averaged (0 = that baseline)
    "vcc_score": ("challenge score", ".3f", True),
}


def headline_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """The pooled (``fold == 'all'``) rows of CCFM, additive and no-change, in that order."""
    pooled = summary[summary["fold"].astype(str) == "all"].set_index("method")
    missing = [method for method in HEADLINE_METHODS if method not in pooled.index]
    if missing:
        raise ValueError(f"summary table has no pooled row for {missing}; methods present: {sorted(pooled.index)}")
    columns = [c for c in (*HEADLINE_METRICS, "energy_distance_floor", "std_ratio") if c in pooled.columns]
    return pooled.loc[list(HEADLINE_METHODS), ["n_perturbations", *columns]]


def _method_line(method: str, row: pd.Series) -> str:
    parts = []
    for metric, (name, fmt, _) in HEADLINE_METRICS.items():
        if metric in row:
            floor = row.get(f"{metric}_floor")
            parts.append(f"{name} {row[metric]:{fmt}}" + ("" if floor is None else f" (real-vs-real {floor:{fmt}})"))
    if "std_ratio" in row:
        parts.append(f"std ratio {row['std_ratio']:.2f}")
    return f"  {method:<9} " + "   ".join(parts)


def verdicts(rows: pd.DataFrame, against: str = "additive") -> list[str]:
    """One line naming the metrics on which CCFM beats ``against`` and one naming those it loses."""
    wins, losses = [], []
    for metric, (name, _, higher_better) in HEADLINE_METRICS.items():
        if metric not in rows.columns:
            continue
        ours, theirs = float(rows.loc["ccfm", metric]), float(rows.loc[against, metric])
        (wins if (ours > theirs if higher_better else ours < theirs) else losses).append(name)
    lines = []
    if wins:
        lines.append(f"  CCFM beats the {against} baseline on: {', '.join(wins)}.")
    if losses:
        lines.append(f"  CCFM LOSES to the {against} baseline on: {', '.join(losses)}.")
    return lines


def headline(summary_tsv: str | Path) -> str:
    """A line per method and the verdicts against the additive baseline for one ``metrics_summary.tsv``."""
    summary = pd.read_csv(summary_tsv, sep="\t")
    rows = headline_rows(summary)
    dataset = str(summary["dataset"].iloc[0])
    n_perturbations = int(rows["n_perturbations"].iloc[0])
    lines = [f"{dataset}: {n_perturbations} held-out perturbations ({summary_tsv})"]
    lines += [_method_line(str(method), row) for method, row in rows.iterrows()]
    ccfm_mse, additive_mse = rows.loc["ccfm", "mse"], rows.loc["additive", "mse"]
    if ccfm_mse < additive_mse:
        lines.append(f"  CCFM's MSE is {additive_mse / ccfm_mse:.2f}x lower than the additive baseline's.")
    lines += verdicts(rows)
    return "\n".join(lines)


TARGET_HEADLINE_METHODS = ("ccfm_adapted", "ccfm_unadapted", "state_adapted", "state_unadapted", "additive", "cellmean")


def target_headline(target_summary_tsv: str | Path) -> str:
    """The challenge score lines of one ``target_summary.tsv`` (adapted vs unadapted vs baselines)."""
    summary = pd.read_csv(target_summary_tsv, sep="\t").set_index("method")
    if "vcc_score" not in summary.columns:
        return f"{target_summary_tsv}: no challenge score (score.profile without cell-eval)"
    lines = [
        f"target context: {int(summary['n_perturbations'].iloc[0])} perturbations, challenge score against the "
        f"cell-mean baseline ({target_summary_tsv})"
    ]
    for method in [m for m in TARGET_HEADLINE_METHODS if m in summary.index]:
        row = summary.loc[method]
        lines.append(
            f"  {method:<15} score {row['vcc_score']:.3f}   DES {row['vcc_des']:.3f}   PDS {row['vcc_pds']:.3f}"
            f"   MAE {row['vcc_mae']:.4f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ccfm.evaluate.headline", description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="+", help="results/{dataset}/metrics_summary.tsv files")
    parser.add_argument("--report", help="path of the HTML report, printed for the user")
    args = parser.parse_args(argv)
    for summary_tsv in args.summaries:
        print(headline(summary_tsv))
    if args.report:
        print(f"Report: {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
