"""Scoring with Arc Institute's cell-eval (the real package, its Python API).

:func:`score_prediction` checks the prediction against the real held-out cells (same genes in the
same order, every real perturbation predicted, controls in both; see
:func:`ccfm.io.predictions.align_prediction_to_real`), runs ``cell_eval.MetricsEvaluator`` with
``break_on_error=True`` so a failing metric stops the run instead of silently vanishing from the
table, and writes the per-perturbation and aggregate tables atomically. It also computes the
compact literature metrics of :mod:`ccfm.evaluate.metrics` on the same aligned pair.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ccfm import CONTROL_LABEL, PERT_COLUMN
from ccfm.config import section_defaults
from ccfm.data.validation import CELL_EVAL_PROFILES, scoring_profile
from ccfm.evaluate.metrics import TOP_DE, compact_metrics, training_cells
from ccfm.io.atomic import write_table_atomic
from ccfm.io.predictions import align_prediction_to_real, read_expression_h5ad

log = logging.getLogger(__name__)

# The schema's `score.profile` default (one home for it).
CELL_EVAL_PROFILE: str = section_defaults("score")["profile"]


@dataclass(frozen=True)
class ScoreOptions:
    """How a fold is scored: the ``score`` rule's params (config ``score.profile``, ``score.top_de``, ``seed``)."""

    cell_eval_profile: str = CELL_EVAL_PROFILE
    top_de: int = TOP_DE
    seed: int = 0
    num_threads: int = 1
    control_label: str = CONTROL_LABEL
    pert_col: str = PERT_COLUMN


@dataclass
class ScoreTables:
    """cell-eval's per-perturbation and aggregate tables plus the compact metric table."""

    results: pd.DataFrame
    aggregate: pd.DataFrame
    compact: pd.DataFrame


def _as_float32_csr(adata: ad.AnnData) -> ad.AnnData:
    """cell-eval's DE (numba) needs float32/64; keep the matrix sparse to bound memory."""
    matrix = adata.X
    adata.X = sp.csr_matrix(matrix, dtype=np.float32) if sp.issparse(matrix) else np.asarray(matrix, dtype=np.float32)
    return adata


def run_cell_eval(
    pred: ad.AnnData,
    real: ad.AnnData,
    control_label: str = CONTROL_LABEL,
    cell_eval_profile: str = CELL_EVAL_PROFILE,
    num_threads: int = 1,
    pert_col: str = PERT_COLUMN,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run cell-eval on an aligned pair; return (per-perturbation, aggregate) tables as pandas.

    cell-eval writes its DE tables into an output directory; a temporary one is used and
    discarded, since only the metric tables are part of the pipeline's contract.
    """
    if cell_eval_profile not in CELL_EVAL_PROFILES:
        raise ValueError(
            f"unknown cell-eval profile {cell_eval_profile!r}; config score.profile must be one of {CELL_EVAL_PROFILES}"
        )
    # Imported here: cell-eval pulls in polars, numba and pdex, which the rest of the package
    # does not need at import time.
    from cell_eval import MetricsEvaluator

    with tempfile.TemporaryDirectory(prefix="cell-eval-") as outdir:
        evaluator = MetricsEvaluator(
            adata_pred=_as_float32_csr(pred),
            adata_real=_as_float32_csr(real),
            control_pert=control_label,
            pert_col=pert_col,
            num_threads=max(1, int(num_threads)),
            outdir=outdir,
        )
        results, aggregate = evaluator.compute(profile=cell_eval_profile, write_csv=False, break_on_error=True)
    return results.to_pandas(), aggregate.to_pandas()


def score_prediction(
    pred_h5ad: str | Path,
    real_h5ad: str | Path,
    options: ScoreOptions = ScoreOptions(),
    pca_reference: ad.AnnData | None = None,
) -> ScoreTables:
    """Score one prediction file against the fold's real cells with cell-eval and the compact metrics.

    ``pca_reference``: real training cells the cell-level metrics' PCA space is fitted on
    (:func:`ccfm.evaluate.metrics.training_cells`); without it, the fold's real cells.
    """
    control_label, pert_col = options.control_label, options.pert_col
    real = read_expression_h5ad(real_h5ad, pert_col)
    pred = read_expression_h5ad(pred_h5ad, pert_col)
    pred = align_prediction_to_real(pred, real, control_label, pert_col, source=str(pred_h5ad))
    # Also checked by the split rule; again here for a profile changed after the split was made.
    labels = real.obs[pert_col].astype(str)
    n_perturbations = int(labels[labels != control_label].nunique())
    cell_eval_profile, note = scoring_profile(n_perturbations, options.cell_eval_profile, str(real_h5ad))
    if note:  # the split file records the same fallback for the report
        log.warning("%s", note)
    compact = compact_metrics(
        pred, real, control_label, options.top_de, pert_col=pert_col, seed=options.seed, pca_reference=pca_reference
    )
    results, aggregate = run_cell_eval(pred, real, control_label, cell_eval_profile, options.num_threads, pert_col)
    log.info("scored %s: %d perturbations, %d cell-eval metrics", pred_h5ad, len(results), results.shape[1] - 1)
    return ScoreTables(results=results, aggregate=aggregate, compact=compact)


def score_methods_to_files(
    preds: Mapping[str, str | Path],
    real_h5ad: str | Path,
    outputs: Mapping[str, tuple[str | Path, str | Path, str | Path]],
    options: ScoreOptions = ScoreOptions(),
    processed_h5ad: str | Path | None = None,
    split_json: str | Path | None = None,
) -> None:
    """Score several methods' predictions of one fold in one process.

    cell-eval's numba kernels (DE tests, neighbour graphs) compile on first use in each process,
    which costs more than scoring a small fold: one process per fold compiles them once.
    ``outputs`` maps each method to its (results CSV, aggregate CSV, compact TSV) paths. With
    ``processed_h5ad`` and ``split_json`` the cell-level metrics' PCA space is fitted on the
    fold's real training cells (read once for every method).
    """
    missing = sorted(set(preds) - set(outputs))
    if missing:
        raise ValueError(f"no output paths for method(s) {missing}")
    reference = None
    if processed_h5ad is not None and split_json is not None:
        reference = training_cells(
            str(processed_h5ad),
            str(split_json),
            seed=int(options.seed),
            pert_col=options.pert_col,
        )
    for method, pred_h5ad in preds.items():
        tables = score_prediction(pred_h5ad, real_h5ad, options, pca_reference=reference)
        write_score_tables(tables, *outputs[method])


def write_score_tables(
    tables: ScoreTables, results_csv: str | Path, agg_csv: str | Path, compact_tsv: str | Path
) -> None:
    """Write the three score tables atomically (CSV for cell-eval's, TSV for the compact one)."""
    write_table_atomic(tables.results, results_csv, index=False)
    write_table_atomic(tables.aggregate, agg_csv, index=False)
    write_table_atomic(tables.compact, compact_tsv, sep="\t", index=False)
