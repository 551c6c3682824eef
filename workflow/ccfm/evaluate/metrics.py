"""Compact per-perturbation metrics, comparable with the perturbation-prediction literature.

cell-eval (:mod:`ccfm.evaluate.celleval`) gives the full picture; this module adds the handful of numbers
most papers report, computed the way GEARS and scPerturb define them:

- ``pearson_delta_pseudobulk``: Pearson correlation between predicted and observed mean shifts,
  delta = mean(perturbed cells) − mean(control cells), over all genes. Both deltas use the real
  control mean (the prediction file carries the same real controls, so this is also its own).
  cell-eval's ``pearson_delta`` (``celleval_pearson_delta`` in the summary) has the same
  definition; this one is computed in float64 and is always defined.
- ``pearson_delta_top_de``: the same over the perturbation's top-``top_de`` DE genes (GEARS:
  genes ranked by |t| of a Welch t-test of the real perturbed cells against the real controls,
  as scanpy's ``rank_genes_groups(method="t-test", rankby_abs=True)`` does).
- ``mse`` / ``mse_top_de``: mean squared error of the predicted mean profile (log1p scale).
- ``sq_mean_shift``: scPerturb's E-distance with squared Euclidean distances,
  2·E‖X−Y‖² − E‖X−X'‖² − E‖Y−Y'‖², which is exactly 2·‖mean(X) − mean(Y)‖²: a statistic of
  means, named for what it is. It is taken in the PCA space below.
- the cell-level metrics of :mod:`ccfm.evaluate.cells` (Euclidean energy distance, RBF MMD, std
  ratio, correlation error on the top DE genes), each beside its real-vs-real split-half floor,
  in the space of the first ``n_pcs`` principal components fitted on real *training* cells
  (controls and training perturbations, all genes; ``pca_cells``) when they are given, else on
  the fold's real cells. Predictions are projected into that fixed space.

Control cells are summarised without densifying (sparse mean and variance); perturbed cells are
dense one perturbation at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats
from sklearn.decomposition import PCA

from ccfm import CONTROL_LABEL, PERT_COLUMN
from ccfm.config import section_defaults
from ccfm.evaluate.cells import CELL_COLUMNS, cell_metrics
from ccfm.io.atomic import write_table_atomic
from ccfm.io.predictions import align_prediction_to_real

log = logging.getLogger(__name__)

# How many top differentially expressed genes the *_top_de metrics use: the schema's `score.top_de` default.
TOP_DE: int = section_defaults("score")["top_de"]

COMPACT_COLUMNS = [
    "perturbation",
    "n_cells_pred",
    "n_cells_real",
    "pearson_delta_pseudobulk",
    "pearson_delta_top_de",
    "mse",
    "mse_top_de",
    "sq_mean_shift",
    *CELL_COLUMNS,
    "top_de",
]


@dataclass(frozen=True)
class MeanVar:
    """Per-gene mean and unbiased variance of a group of cells."""

    mean: np.ndarray
    var: np.ndarray
    n: int


def mean_var(matrix: sp.spmatrix | np.ndarray) -> MeanVar:
    """Per-gene mean and variance (ddof=1) of the rows of ``matrix``, sparse-aware."""
    n = matrix.shape[0]
    if sp.issparse(matrix):
        csr = sp.csr_matrix(matrix, dtype=np.float64)
        mean = np.asarray(csr.mean(axis=0)).ravel()
        mean_sq = np.asarray(csr.multiply(csr).mean(axis=0)).ravel()
    else:
        dense = np.asarray(matrix, dtype=np.float64)
        mean = dense.mean(axis=0)
        mean_sq = (dense * dense).mean(axis=0)
    var = np.maximum(mean_sq - mean * mean, 0.0) * (n / (n - 1) if n > 1 else 0.0)
    return MeanVar(mean=mean, var=var, n=n)


def welch_t(group: MeanVar, reference: MeanVar) -> np.ndarray:
    """Welch t statistic of ``group`` against ``reference`` per gene (0 where both are constant)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = stats.ttest_ind_from_stats(
            group.mean,
            np.sqrt(group.var),
            max(group.n, 1),
            reference.mean,
            np.sqrt(reference.var),
            max(reference.n, 1),
            equal_var=False,
        ).statistic
    return np.where(np.isfinite(t), t, 0.0)


def top_de_indices(group: MeanVar, control: MeanVar, n_genes: int) -> np.ndarray:
    """Indices of the ``n_genes`` genes with the largest |Welch t| (ties broken by gene order)."""
    score = np.abs(welch_t(group, control))
    order = np.argsort(-score, kind="stable")
    return order[: min(n_genes, score.size)]


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant (correlation undefined)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.pearsonr(x, y).statistic)


def pearson_delta(pred_mean: np.ndarray, real_mean: np.ndarray, control_mean: np.ndarray) -> float:
    """Pearson correlation of predicted and observed shifts from the control mean."""
    return pearson(pred_mean - control_mean, real_mean - control_mean)


def squared_mean_shift(x: np.ndarray, y: np.ndarray) -> float:
    """scPerturb's E-distance with squared Euclidean distances: 2·δ_XY − σ_X − σ_Y.

    δ_XY is the mean distance over all pairs between the sets, σ the mean over all pairs within a
    set (diagonal included, as scPerturb/pertpy do). With squared Euclidean distances this
    V-statistic is exactly 2·‖mean(X) − mean(Y)‖², which is what is computed: it sees means
    only (:func:`ccfm.evaluate.cells.energy_distance` is the one that sees cells).
    """
    if len(x) == 0 or len(y) == 0:
        return float("nan")
    diff = np.asarray(x, dtype=np.float64).mean(axis=0) - np.asarray(y, dtype=np.float64).mean(axis=0)
    return float(2.0 * diff @ diff)


def _dense_rows(adata: ad.AnnData, mask: np.ndarray) -> np.ndarray:
    block = adata.X[np.flatnonzero(mask)]
    return block.toarray() if sp.issparse(block) else np.asarray(block)


def _subsample(rows: np.ndarray, max_cells: int, rng: np.random.Generator) -> np.ndarray:
    if len(rows) <= max_cells:
        return rows
    return rows[np.sort(rng.choice(len(rows), size=max_cells, replace=False))]


def fit_real_pca(real: ad.AnnData, n_pcs: int, max_cells: int, seed: int) -> PCA:
    """PCA of the real cells (a seeded subsample of at most ``max_cells``), dense only on that subsample.

    ``real`` may be opened backed (``backed="r"``): only the subsample's rows are read.
    """
    rng = np.random.default_rng(seed)
    rows = np.arange(real.n_obs)
    if real.n_obs > max_cells:
        rows = np.sort(rng.choice(real.n_obs, size=max_cells, replace=False))
    block = real.X[rows]
    dense = block.toarray() if sp.issparse(block) else np.asarray(block)
    n_components = max(1, min(n_pcs, dense.shape[0] - 1, dense.shape[1]))
    return PCA(n_components=n_components, svd_solver="auto", random_state=seed).fit(dense.astype(np.float64))


def training_cells(
    processed_h5ad: str, split_json: str, max_cells: int = 5000, seed: int = 0, pert_col: str = PERT_COLUMN
) -> ad.AnnData:
    """A seeded subsample (at most ``max_cells``) of the fold's real training cells: controls and
    training perturbations of ``processed.h5ad``, read backed (only the drawn rows are loaded)."""
    from ccfm.io.splits import read_split

    split = read_split(split_json)
    keep = {str(label) for label in split["train"]} | {str(split.get("controls", CONTROL_LABEL))}
    backed = ad.read_h5ad(processed_h5ad, backed="r")
    try:
        labels = backed.obs[pert_col].astype(str).to_numpy()
        rows = np.flatnonzero(np.isin(labels, sorted(keep)))
        if rows.size > max_cells:
            rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_cells, replace=False))
        block = backed.X[rows]
        matrix = sp.csr_matrix(block) if sp.issparse(block) else np.asarray(block)
        return ad.AnnData(X=matrix, obs=backed.obs.iloc[rows].copy(), var=backed.var.copy())
    finally:
        backed.file.close()


@dataclass(frozen=True)
class MetricSizes:
    """Sizes of the compact metrics' PCA space and cell samples (method constants, not config)."""

    n_pcs: int = 50  # PCA components of the cell-level space
    max_cells: int = 500  # cells per side and perturbation for the distances (seeded subsample)
    pca_cells: int = 5000  # cells the PCA is fitted on (seeded subsample)


def compact_metrics(
    pred: ad.AnnData,
    real: ad.AnnData,
    control_label: str = CONTROL_LABEL,
    top_de: int = TOP_DE,
    *,
    pert_col: str = PERT_COLUMN,
    seed: int = 0,
    pca_reference: ad.AnnData | None = None,
    sizes: MetricSizes = MetricSizes(),
) -> pd.DataFrame:
    """Per-perturbation compact metrics (columns :data:`COMPACT_COLUMNS`), one row per real perturbation.

    ``pred`` must predict every perturbation of ``real`` (otherwise :class:`PredictionError`);
    predicted perturbations without real cells are ignored. Cells are subsampled (seeded) to at
    most ``sizes.max_cells`` per side for the distances. ``pca_reference`` holds the real training
    cells the PCA space is fitted on (:func:`training_cells`, same genes as ``real``); without
    it the space is fitted on ``real``.
    """
    pred = align_prediction_to_real(pred, real, control_label, pert_col)
    real_labels = real.obs[pert_col].astype(str).to_numpy()
    pred_labels = pred.obs[pert_col].astype(str).to_numpy()
    control = mean_var(real.X[np.flatnonzero(real_labels == control_label)])
    if pca_reference is not None and list(pca_reference.var_names) != list(real.var_names):
        raise ValueError("the PCA reference cells must have the genes of the real cells, in the same order")
    pca = fit_real_pca(real if pca_reference is None else pca_reference, sizes.n_pcs, sizes.pca_cells, seed)
    max_cells = sizes.max_cells
    rng = np.random.default_rng(seed)
    rows = []
    for pert in sorted(set(real_labels) - {control_label}):
        real_cells = _dense_rows(real, real_labels == pert)
        pred_cells = _dense_rows(pred, pred_labels == pert)
        real_stats = mean_var(real_cells)
        pred_mean = pred_cells.mean(axis=0, dtype=np.float64)
        de = top_de_indices(real_stats, control, top_de)
        err = (pred_mean - real_stats.mean) ** 2
        rows.append(
            {
                "perturbation": pert,
                "n_cells_pred": len(pred_cells),
                "n_cells_real": len(real_cells),
                "pearson_delta_pseudobulk": pearson_delta(pred_mean, real_stats.mean, control.mean),
                "pearson_delta_top_de": pearson_delta(pred_mean[de], real_stats.mean[de], control.mean[de]),
                "mse": float(err.mean()),
                "mse_top_de": float(err[de].mean()),
                "sq_mean_shift": squared_mean_shift(
                    pca.transform(_subsample(pred_cells, max_cells, rng).astype(np.float64)),
                    pca.transform(_subsample(real_cells, max_cells, rng).astype(np.float64)),
                ),
                **cell_metrics(pred_cells, real_cells, pca.transform, de, rng, max_cells),
                "top_de": int(len(de)),
            }
        )
    return pd.DataFrame(rows, columns=COMPACT_COLUMNS)


SUMMARY_COMPACT_METRICS = [
    "pearson_delta_pseudobulk",
    "pearson_delta_top_de",
    "mse",
    "mse_top_de",
    "sq_mean_shift",
    *CELL_COLUMNS,
]


def celleval_means(aggregate: pd.DataFrame) -> dict[str, float]:
    """The ``mean`` row of a cell-eval aggregate table (polars ``describe`` layout), prefixed ``celleval_``."""
    if "statistic" not in aggregate.columns or "mean" not in set(aggregate["statistic"]):
        raise ValueError(
            "cell-eval aggregate table has no 'statistic' == 'mean' row; was it written by the score rule?"
        )
    row = aggregate.loc[aggregate["statistic"] == "mean"].iloc[0].drop("statistic")
    return {f"celleval_{name}": float(value) for name, value in row.items()}


# The challenge score's baseline on held-out source perturbations: the training perturbations'
# mean effect (what the challenge's cell-mean baseline is, computed from training cells only).
CHALLENGE_BASELINE = "meanpert"


def challenge_columns(
    entries: Sequence[tuple[str, int | str, pd.DataFrame, pd.DataFrame]],
) -> dict[tuple[str, str], dict[str, float]]:
    """Virtual-Cell-Challenge-style scores (:func:`ccfm.evaluate.vcc.challenge_score`) per (method, fold).

    DES (``overlap_at_N``), PDS (``discrimination_score_l1``) and MAE of each method, each scaled
    against the fold's :data:`CHALLENGE_BASELINE` (which scores 0), and their mean
    (``vcc_score``). Folds without that baseline or without those cell-eval metrics (a profile
    that skips them) get no columns.
    """
    from ccfm.evaluate.vcc import VCC_METRICS, challenge_score

    baselines = {str(fold): agg for method, fold, _, agg in entries if method == CHALLENGE_BASELINE}
    columns: dict[tuple[str, str], dict[str, float]] = {}
    for method, fold, _, aggregate in entries:
        baseline = baselines.get(str(fold))
        if baseline is None or any(m not in aggregate or m not in baseline for m in VCC_METRICS.values()):
            continue
        score = challenge_score(aggregate, baseline)
        columns[(method, str(fold))] = {
            **{f"vcc_{name}_scaled": score[f"{name}_scaled"] for name in VCC_METRICS},
            "vcc_score": score["score"],
        }
    return columns


def summarize_scores(
    entries: Sequence[tuple[str, int | str, pd.DataFrame, pd.DataFrame]], dataset: str
) -> pd.DataFrame:
    """One row per (method, fold) plus a ``fold == "all"`` row per method (mean over folds).

    Each entry is (method, fold, compact metric table, cell-eval aggregate table). Values are means
    over the held-out perturbations of the fold; cell-eval columns are prefixed ``celleval_``;
    the challenge-style scores (:func:`challenge_columns`) are ``vcc_*``.
    """
    challenge = challenge_columns(entries)
    rows = []
    for method, fold, compact, aggregate in entries:
        row: dict[str, object] = {
            "dataset": dataset,
            "method": method,
            "fold": str(fold),
            "n_perturbations": len(compact),
        }
        # tables written before a metric existed summarise without it
        row.update({m: float(compact[m].mean()) for m in SUMMARY_COMPACT_METRICS if m in compact})
        row.update(celleval_means(aggregate))
        row.update(challenge.get((method, str(fold)), {}))
        rows.append(row)
    table = pd.DataFrame(rows)
    numeric = [c for c in table.columns if c not in ("dataset", "method", "fold")]
    overall = table.groupby("method", sort=False)[numeric].mean().reset_index()
    overall.insert(0, "dataset", dataset)
    overall.insert(2, "fold", "all")
    return pd.concat([table, overall], ignore_index=True)


def summarize_score_files(
    methods: Sequence[str],
    folds: Sequence[int | str],
    compact_tsvs: Sequence[str],
    agg_csvs: Sequence[str],
    dataset: str,
    out_tsv: str,
) -> pd.DataFrame:
    """Read the score tables of every (method, fold), summarise them and write ``metrics_summary.tsv``."""
    if not (len(methods) == len(folds) == len(compact_tsvs) == len(agg_csvs)):
        raise ValueError("summarize: methods, folds and the score tables must be parallel lists of one length")
    entries = [
        (method, fold, pd.read_csv(compact, sep="\t"), pd.read_csv(agg))
        for method, fold, compact, agg in zip(methods, folds, compact_tsvs, agg_csvs)
    ]
    table = summarize_scores(entries, dataset)
    write_table_atomic(table, out_tsv, sep="\t", index=False)
    return table
