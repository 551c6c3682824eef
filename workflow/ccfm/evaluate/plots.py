"""Figures of the report: metric comparison, delta scatter, PCA, vocab coverage, loss curves.

Every function takes tables or AnnData already read (the rule scripts read files) plus an output
path, draws with matplotlib's non-interactive Agg backend and writes the PNG atomically. Colours
are fixed per method so one method looks the same in every figure.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: cluster nodes and CI have no display
import anndata as ad  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

from ccfm import CONTROL_LABEL, PERT_COLUMN  # noqa: E402
from ccfm.evaluate.metrics import pearson  # noqa: E402
from ccfm.io.atomic import atomic_output  # noqa: E402

log = logging.getLogger(__name__)

METHOD_COLORS = {
    "ccfm": "#d62728",
    "ccfm_nolatent": "#9467bd",
    "additive": "#1f77b4",
    "meanpert": "#2ca02c",
    "nochange": "#7f7f7f",
}
# Metrics shown in the comparison figure, with the direction that is better.
COMPARISON_METRICS = {
    "pearson_delta_pseudobulk": "higher is better",
    "pearson_delta_top_de": "higher is better",
    "mse": "lower is better",
    "energy_distance": "lower is better",
    "std_ratio": "closer to 1 is better",
    "celleval_discrimination_score_l1": "higher is better",
    "celleval_overlap_at_N": "higher is better",
}


def _color(method: str) -> str:
    return METHOD_COLORS.get(method, "#8c564b")


def _panel_grid(n_panels: int, panel_width: float, panel_height: float) -> tuple[plt.Figure, np.ndarray]:
    """A figure with up to three panels per row; the spare axes of the last row are hidden.

    Returns the figure and all its axes, flat, in reading order (at least one).
    """
    ncols = min(3, max(1, n_panels))
    nrows = int(np.ceil(n_panels / ncols)) or 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_width * ncols, panel_height * nrows), squeeze=False)
    for ax in axes.ravel()[n_panels:]:
        ax.axis("off")
    return fig, axes.ravel()


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 110) -> None:
    """Save ``fig`` as PNG through a temporary file in the same directory, then close it."""
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)


def plot_metric_comparison(summary: pd.DataFrame, out_png: str | Path, dataset: str) -> None:
    """Bar per method (mean over folds) with one dot per fold, for the headline metrics.

    ``summary`` is ``metrics_summary.tsv``: rows per method and fold (``fold`` = ``all`` is the
    mean over folds).
    """
    per_fold = summary[summary["fold"].astype(str) != "all"]
    metrics = [m for m in COMPARISON_METRICS if m in summary.columns]
    methods = list(dict.fromkeys(per_fold["method"]))
    fig, axes = _panel_grid(len(metrics), 3.4, 3.4)
    for ax, metric in zip(axes, metrics):
        for i, method in enumerate(methods):
            values = per_fold.loc[per_fold["method"] == method, metric].astype(float).to_numpy()
            ax.bar(i, np.nanmean(values) if values.size else np.nan, color=_color(method), alpha=0.85)
            ax.scatter(np.full(values.size, i), values, color="black", s=12, zorder=3)
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right")
        ax.set_title(f"{metric}\n({COMPARISON_METRICS[metric]})", fontsize=9)
    fig.suptitle(f"{dataset}: held-out perturbations, mean over perturbations (dots: folds)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_png)


def choose_perturbations(
    real: ad.AnnData, n: int, control_label: str = CONTROL_LABEL, pert_col: str = PERT_COLUMN
) -> list[str]:
    """The ``n`` held-out perturbations with most real cells (ties by name): best-measured shown first."""
    counts = real.obs[pert_col].astype(str).value_counts()
    counts = counts.drop(labels=[control_label], errors="ignore")
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [name for name, _ in ranked[:n]]


def _group_mean(real: ad.AnnData, mask: np.ndarray) -> np.ndarray:
    block = real.X[np.flatnonzero(mask)]
    return np.asarray(block.mean(axis=0), dtype=np.float64).ravel()


def plot_delta_scatter(
    real: ad.AnnData,
    pred_means: Mapping[str, pd.DataFrame],
    out_png: str | Path,
    n_perturbations: int = 4,
    control_label: str = CONTROL_LABEL,
    pert_col: str = PERT_COLUMN,
) -> None:
    """Predicted vs observed mean shift per gene, one row per perturbation, one column per method."""
    labels = real.obs[pert_col].astype(str).to_numpy()
    control_mean = _group_mean(real, labels == control_label)
    perts = choose_perturbations(real, n_perturbations, control_label, pert_col)
    methods = list(pred_means)
    fig, axes = plt.subplots(len(perts), len(methods), figsize=(2.6 * len(methods), 2.5 * len(perts)), squeeze=False)
    for row, pert in zip(axes, perts):
        observed = _group_mean(real, labels == pert) - control_mean
        for ax, method in zip(row, methods):
            predicted = pred_means[method].loc[pert, list(real.var_names)].to_numpy(dtype=np.float64) - control_mean
            lim = float(np.nanmax(np.abs(np.concatenate([observed, predicted])))) or 1.0
            ax.plot([-lim, lim], [-lim, lim], color="#bbbbbb", lw=0.8)
            ax.scatter(observed, predicted, s=5, color=_color(method), alpha=0.7)
            ax.set_xlim(-lim * 1.05, lim * 1.05)
            ax.set_ylim(-lim * 1.05, lim * 1.05)
            ax.set_title(f"{pert} · {method}\nr = {pearson(predicted, observed):.2f}", fontsize=8)
            ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("observed delta (log1p)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("predicted delta", fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_png)


def _dense_sample(adata: ad.AnnData, mask: np.ndarray, max_cells: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``max_cells`` rows of ``adata`` under ``mask`` (seeded draw), dense float64."""
    rows = np.flatnonzero(mask)
    if rows.size > max_cells:
        rows = np.sort(rng.choice(rows, size=max_cells, replace=False))
    block = adata.X[rows]
    return (block.toarray() if sp.issparse(block) else np.asarray(block)).astype(np.float64)


@dataclass(frozen=True)
class PcaPanels:
    """Size of the PCA figure: panels (perturbations shown) and cells drawn per group and panel."""

    n_perturbations: int = 6
    max_cells: int = 300


def plot_prediction_pca(
    pred: ad.AnnData,
    real: ad.AnnData,
    out_png: str | Path,
    method: str,
    panels: PcaPanels = PcaPanels(),
    seed: int = 0,
    control_label: str = CONTROL_LABEL,
    pert_col: str = PERT_COLUMN,
) -> None:
    """Per perturbation: real controls, real perturbed and predicted cells in 2 PCs.

    The PCA of each panel is fitted on that perturbation's real cells plus the real controls, so
    PC1 follows the real response (a PCA of all cells is dominated by the largest responses and
    flattens the others); predicted cells are projected into it.
    """
    rng = np.random.default_rng(seed)
    real_labels = real.obs[pert_col].astype(str).to_numpy()
    pred_labels = pred.obs[pert_col].astype(str).to_numpy()
    max_cells = panels.max_cells
    controls = _dense_sample(real, real_labels == control_label, max_cells, rng)
    chosen = choose_perturbations(real, panels.n_perturbations, control_label, pert_col)
    perts = [p for p in chosen if p in set(pred_labels)]
    fig, axes = _panel_grid(len(perts), 3.3, 3.1)
    for ax, pert in zip(axes, perts):
        real_cells = _dense_sample(real, real_labels == pert, max_cells, rng)
        pred_cells = _dense_sample(pred, pred_labels == pert, max_cells, rng)
        pca = PCA(n_components=2, random_state=seed).fit(np.vstack([controls, real_cells]))
        for cells, style in (
            (controls, dict(s=4, color="#cccccc", label="real control")),
            (real_cells, dict(s=6, color="#222222", alpha=0.6, label="real perturbed")),
            (pred_cells, dict(s=8, color=_color(method), alpha=0.7, marker="^", label=f"{method} (predicted)")),
        ):
            xy = pca.transform(cells)
            ax.scatter(xy[:, 0], xy[:, 1], **style)
        ax.set_title(pert, fontsize=9)
        ax.set_xlabel("PC1", fontsize=8)
        ax.set_ylabel("PC2", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7, markerscale=2, loc="best")
    fig.suptitle(f"{method}: predicted vs real cells (PCA of real perturbed + control cells per panel)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_png)


def plot_gene_vocab_coverage(vocab: pd.DataFrame, out_png: str | Path, dataset: str) -> None:
    """Number of genes per scGPT vocab match kind, with the mapped percentage in the title."""
    order = ["exact", "case_insensitive", "ensembl", "none"]
    counts = vocab["match"].astype(str).value_counts()
    kinds = [k for k in order if k in counts.index] + [k for k in counts.index if k not in order]
    mapped = int(counts.drop(labels=["none"], errors="ignore").sum())
    fig, ax = plt.subplots(figsize=(5, 3.2))
    colors = ["#2ca02c" if k != "none" else "#d62728" for k in kinds]
    ax.bar(kinds, [int(counts[k]) for k in kinds], color=colors)
    for i, kind in enumerate(kinds):
        ax.text(i, counts[kind], str(int(counts[kind])), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("genes")
    ax.set_title(
        f"{dataset}: {mapped}/{len(vocab)} genes in the scGPT vocabulary ({100 * mapped / max(len(vocab), 1):.1f}%)",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, out_png)


def plot_loss_curves(losses: Mapping[str, pd.DataFrame], out_png: str | Path, title: str) -> None:
    """Training loss terms and learning rate over steps, one line per model variant."""
    terms = ["total", "expr", "latent", "mmd", "lr"]
    fig, axes = plt.subplots(1, len(terms), figsize=(3.0 * len(terms), 3.0), squeeze=False)
    for ax, term in zip(axes[0], terms):
        for variant, table in losses.items():
            if term not in table.columns:
                continue
            values = pd.to_numeric(table[term], errors="coerce")
            if values.notna().any():
                ax.plot(table["step"], values, label=variant, color=_color(variant), lw=1.2)
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if term != "lr" and ax.lines:
            positive = all(np.nanmin(line.get_ydata()) > 0 for line in ax.lines)
            if positive:
                ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_png)


def read_loss_tables(paths: Mapping[str, str | Path]) -> dict[str, pd.DataFrame]:
    """Read ``loss.tsv`` files per variant, checking the contract's columns."""
    required = {"step", "total", "expr", "latent", "mmd", "lr"}
    tables = {}
    for variant, path in paths.items():
        table = pd.read_csv(path, sep="\t")
        missing = required - set(table.columns)
        if missing:
            raise ValueError(f"{path}: loss table lacks column(s) {sorted(missing)}; expected {sorted(required)}")
        tables[variant] = table
    return tables


def method_names(paths: Sequence[str | Path]) -> list[str]:
    """Method name of each ``.../{method}/pred_means.csv`` path (its parent directory)."""
    return [Path(p).parent.name for p in paths]


# File-level entry points used by the rule scripts: read the pipeline's files, draw, write.


def metric_comparison_figure(summary_tsv: str | Path, out_png: str | Path, dataset: str) -> None:
    """Figure from ``results/{ds}/metrics_summary.tsv``."""
    plot_metric_comparison(pd.read_csv(summary_tsv, sep="\t"), out_png, dataset)


def delta_scatter_figure(
    real_h5ad: str | Path,
    pred_means_csvs: Sequence[str | Path],
    out_png: str | Path,
    n_perturbations: int = 4,
    control_label: str = CONTROL_LABEL,
) -> None:
    """Figure from a fold's ``real.h5ad`` and every method's ``pred_means.csv`` (method = parent folder)."""
    real = ad.read_h5ad(real_h5ad)
    means = {}
    for method, path in zip(method_names(pred_means_csvs), pred_means_csvs):
        table = pd.read_csv(path, index_col=0)
        table.index = table.index.astype(str)
        means[method] = table
    plot_delta_scatter(real, means, out_png, n_perturbations, control_label)


def prediction_pca_figures(
    preds: Mapping[str, str | Path],
    real_h5ad: str | Path,
    out_pngs: Mapping[str, str | Path],
    seed: int = 0,
    control_label: str = CONTROL_LABEL,
) -> None:
    """One PCA figure per method (``preds`` and ``out_pngs`` keyed by method), real cells read once."""
    real = ad.read_h5ad(real_h5ad)
    for method, pred_h5ad in preds.items():
        plot_prediction_pca(
            ad.read_h5ad(pred_h5ad), real, out_pngs[method], method, seed=seed, control_label=control_label
        )


def gene_vocab_figure(vocab_tsv: str | Path, out_png: str | Path, dataset: str) -> None:
    """Figure from ``results/{ds}/gene_vocab.tsv`` (columns gene, vocab_id, match)."""
    vocab = pd.read_csv(vocab_tsv, sep="\t", dtype={"gene": str, "match": str})
    if "match" not in vocab.columns:
        raise ValueError(f"{vocab_tsv}: no 'match' column; expected columns gene, vocab_id, match")
    plot_gene_vocab_coverage(vocab, out_png, dataset)


def loss_curves_figure(loss_tsvs: Sequence[str | Path], out_png: str | Path, title: str) -> None:
    """Figure from ``.../{variant}/loss.tsv`` files (variant = parent folder)."""
    plot_loss_curves(read_loss_tables(dict(zip(method_names(loss_tsvs), loss_tsvs))), out_png, title)


def plot_adapt_history(history_tsv: str | Path, out_png: str | Path, title: str) -> None:
    """Validation (and training-batch) MMD² over the adaptation steps."""

    history = pd.read_csv(history_tsv, sep="\t")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history["step"], history["train_mmd2"], marker=".", label="training batch", color="#9467bd", alpha=0.6)
    ax.plot(history["step"], history["val_mmd2"], marker="o", label="validation controls", color="#d62728")
    best = history.loc[history["val_mmd2"].idxmin()]
    ax.axvline(
        best["step"], color="#7f7f7f", linestyle="--", linewidth=1, label=f"kept shift (step {int(best['step'])})"
    )
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("MMD² (unbiased)")
    ax.set_title(title)
    ax.legend(frameon=False)
    save_figure(fig, out_png)


def plot_runtime(table: pd.DataFrame, out_png: str | Path, dataset: str) -> None:
    """Horizontal bars of wall seconds per job (``ccfm.evaluate.runtime.read_benchmarks``), slowest on top."""
    table = table.sort_values("seconds")
    fig, ax = plt.subplots(figsize=(7.0, 0.6 + 0.22 * len(table)))
    ax.barh(table["job"], table["seconds"], color="#1f77b4")
    ax.set_xlabel("wall time (s)")
    ax.set_title(f"{dataset}: {table['seconds'].sum():.0f} s summed over {len(table)} jobs")
    ax.tick_params(axis="y", labelsize=7)
    save_figure(fig, out_png)
