"""Prediction files: the one format every method (CCFM and the baselines) writes and scoring reads.

A prediction is an AnnData (``pred.h5ad``) on the log1p-normalised scale with the same genes, in
the same order, as the real data; ``obs["target_gene"]`` names the perturbation of each cell and
the real control cells are included under the control label (cell-eval computes every delta
against each file's own controls, so the prediction must carry the real ones). Beside it,
``pred_means.csv`` holds one row per predicted perturbation (mean log1p expression per gene), the
small file figures and quick checks read without loading cells.

Writers are atomic (:mod:`ccfm.io.atomic`) so an interrupted job never leaves a
truncated file that Snakemake would take as finished.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ccfm import CONTROL_LABEL, PERT_COLUMN
from ccfm.io.atomic import write_table_atomic
from ccfm.io.h5ad import modelled_mask, write_h5ad_atomic

log = logging.getLogger(__name__)

# cell-eval refuses log1p data at or above this value (it takes it for another scale).
CELL_EVAL_MAX_LOG1P = 15.0


class PredictionError(ValueError):
    """A prediction file or array breaks the prediction contract; the message names the fix."""


def _check_matrix(name: str, matrix: np.ndarray | sp.spmatrix, n_genes: int) -> None:
    """Raise unless ``matrix`` is 2-D with ``n_genes`` columns, finite and non-negative."""
    if matrix.ndim != 2 or matrix.shape[1] != n_genes:
        raise PredictionError(
            f"{name}: expected a (cells, {n_genes}) matrix matching the gene list, got shape "
            f"{tuple(matrix.shape)}; predict on exactly the genes of processed.h5ad"
        )
    if matrix.shape[0] == 0:
        raise PredictionError(f"{name}: no cells; generate at least one cell per perturbation")
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    if values.size and not np.all(np.isfinite(values)):
        raise PredictionError(f"{name}: contains NaN or infinite values; check the generator output")
    if values.size and values.min() < 0:
        raise PredictionError(
            f"{name}: contains negative values (min {values.min():.4g}); predictions are on the "
            "log1p scale and must be clamped at 0"
        )
    if values.size and values.max() >= CELL_EVAL_MAX_LOG1P:
        raise PredictionError(
            f"{name}: maximum {values.max():.4g} is not a log1p-normalised value (cell-eval "
            f"requires < {CELL_EVAL_MAX_LOG1P}); predict on the log1p scale of processed.h5ad"
        )


def build_prediction_anndata(
    genes: Sequence[str],
    predicted: Mapping[str, np.ndarray],
    controls: sp.spmatrix | np.ndarray,
    control_label: str = CONTROL_LABEL,
) -> ad.AnnData:
    """Assemble the prediction AnnData: the predicted cells of every perturbation, then the controls.

    ``X`` is CSR float32 (predicted log1p profiles are often sparse after clamping at zero, and the
    control cells arrive sparse), ``obs["target_gene"]`` a categorical, ``var_names`` = ``genes``.
    """
    genes = [str(g) for g in genes]
    if len(set(genes)) != len(genes):
        raise PredictionError("gene list has duplicates; use the unique var_names of processed.h5ad")
    if not predicted:
        raise PredictionError("no perturbation was predicted; the fold's held-out list is empty?")
    if control_label in predicted:
        raise PredictionError(
            f"predicted contains the control label {control_label!r}; the real control cells are "
            "added from `controls`, do not predict them"
        )
    blocks: list[sp.csr_matrix] = []
    labels: list[str] = []
    names: list[str] = []
    for pert, cells in predicted.items():
        _check_matrix(f"prediction for {pert!r}", cells, len(genes))
        blocks.append(sp.csr_matrix(np.asarray(cells, dtype=np.float32)))
        labels.extend([pert] * cells.shape[0])
        names.extend(f"{pert}_pred{i}" for i in range(cells.shape[0]))
    _check_matrix("control cells", controls, len(genes))
    blocks.append(sp.csr_matrix(controls, dtype=np.float32))
    labels.extend([control_label] * controls.shape[0])
    names.extend(f"{control_label}_{i}" for i in range(controls.shape[0]))

    matrix = sp.vstack(blocks, format="csr", dtype=np.float32)
    categories = [*predicted.keys(), control_label]
    obs = pd.DataFrame({PERT_COLUMN: pd.Categorical(labels, categories=categories)}, index=pd.Index(names, dtype=str))
    var = pd.DataFrame(index=pd.Index(genes, dtype=str))
    return ad.AnnData(X=matrix, obs=obs, var=var)


def prediction_means(genes: Sequence[str], predicted: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Mean predicted log1p expression per perturbation: rows perturbations, columns genes."""
    rows = {pert: np.asarray(cells, dtype=np.float64).mean(axis=0) for pert, cells in predicted.items()}
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=[str(g) for g in genes])
    frame.index.name = PERT_COLUMN
    return frame


def write_predictions(
    out_h5ad: str | Path,
    out_means_csv: str | Path,
    genes: Sequence[str],
    predicted: Mapping[str, np.ndarray],
    controls: sp.spmatrix | np.ndarray,
    control_label: str = CONTROL_LABEL,
    sources: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Write ``pred.h5ad`` and ``pred_means.csv`` for one method and fold, atomically.

    ``predicted[pert]`` is a (n_cells, n_genes) array of log1p values ≥ 0 for perturbation
    ``pert`` (canonical label ``A`` or ``A+B``); ``controls`` the real control cells (log1p, same
    genes) that the prediction file carries for cell-eval's deltas. ``sources[pert]``: the row
    (among ``controls``) of the control cell each predicted cell started from, recorded as
    ``obs["control_index"]`` (genes written back into the file take that cell's values).
    """
    adata = build_prediction_anndata(genes, predicted, controls, control_label)
    if sources is not None:
        adata.obs["control_index"] = np.concatenate(
            [*(np.asarray(sources[pert]) for pert in predicted), np.arange(controls.shape[0])]
        ).astype(np.int64)
    means = prediction_means(genes, predicted)
    write_h5ad_atomic(adata, out_h5ad)
    write_table_atomic(means, out_means_csv)
    log.info(
        "wrote %d predicted perturbations (%d cells) + %d control cells to %s",
        len(predicted),
        adata.n_obs - controls.shape[0],
        controls.shape[0],
        out_h5ad,
    )


def read_prediction_means(path: str | Path) -> pd.DataFrame:
    """Read ``pred_means.csv`` (rows perturbations, columns genes)."""
    frame = pd.read_csv(path, index_col=0)
    frame.index = frame.index.astype(str)
    return frame


def read_expression_h5ad(path: str | Path, pert_col: str = PERT_COLUMN, *, all_genes: bool = False) -> ad.AnnData:
    """Read a prediction or real h5ad, checking the perturbation column is there.

    Files that carry every gene of the input (``var["modelled"]``, :mod:`ccfm.data.gene_fill`) are
    read on their modelled genes unless ``all_genes``: scores compare what the methods predicted,
    not the values written back for genes no method modelled.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run the rule that writes it first")
    adata = ad.read_h5ad(path)
    if pert_col not in adata.obs.columns:
        raise PredictionError(
            f"{path}: obs has no {pert_col!r} column (columns: {list(adata.obs.columns)}); "
            "prediction and real files must label cells with the canonical perturbation"
        )
    adata.obs[pert_col] = adata.obs[pert_col].astype(str).astype("category")
    modelled = modelled_mask(adata.var)
    if modelled is not None and not all_genes and not modelled.all():
        adata = adata[:, modelled].copy()
    return adata


def perturbation_set(adata: ad.AnnData, control_label: str, pert_col: str = PERT_COLUMN) -> set[str]:
    """The non-control perturbations present in ``adata``."""
    return set(adata.obs[pert_col].astype(str)) - {control_label}


def align_prediction_to_real(
    pred: ad.AnnData,
    real: ad.AnnData,
    control_label: str = CONTROL_LABEL,
    pert_col: str = PERT_COLUMN,
    source: str = "prediction",
) -> ad.AnnData:
    """Validate ``pred`` against ``real`` and return the part of it that scoring uses.

    Checks: identical ``var_names`` in the same order; values finite, ≥ 0 and on the log1p scale;
    control cells present in both; every real perturbation predicted (a missing one is an error,
    never a silent drop). Predicted perturbations absent from the real data (config ``predict:``
    entries without measured cells) are dropped here, with a log line, since nothing can score them.
    """
    if not np.array_equal(np.asarray(pred.var_names), np.asarray(real.var_names)):
        raise PredictionError(
            f"{source}: var_names differ from the real data ({pred.n_vars} vs {real.n_vars} genes, "
            "or a different order); write predictions on the genes of processed.h5ad, in its order"
        )
    _check_matrix(source, pred.X, real.n_vars)
    real_perts = perturbation_set(real, control_label, pert_col)
    pred_perts = perturbation_set(pred, control_label, pert_col)
    for name, adata in (("real data", real), (source, pred)):
        if control_label not in set(adata.obs[pert_col].astype(str)):
            raise PredictionError(
                f"{name}: no control cells labelled {control_label!r} in obs[{pert_col!r}]; include "
                "the real control cells (cell-eval computes deltas against them)"
            )
    missing = sorted(real_perts - pred_perts)
    if missing:
        raise PredictionError(
            f"{source}: {len(missing)} held-out perturbation(s) of the real data are not predicted: "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}; predict every perturbation of "
            "the fold's test list"
        )
    extra = sorted(pred_perts - real_perts)
    if extra:
        log.info(
            "%s: %d predicted perturbation(s) have no real cells and are not scored: %s", source, len(extra), extra[:10]
        )
        keep = ~pred.obs[pert_col].astype(str).isin(extra).to_numpy()
        pred = pred[keep].copy()
        pred.obs[pert_col] = pred.obs[pert_col].astype(str).astype("category")
    return pred


def prediction_table(
    entries: Sequence[tuple[str, int | str, str | Path]],
    tests: Mapping[str, Sequence[str]],
    control_label: str = CONTROL_LABEL,
) -> pd.DataFrame:
    """What every method predicted, one row per (fold, method, perturbation), from the files' metadata only.

    ``entries``: (method, fold, pred.h5ad); ``tests``: fold -> the fold's held-out list (scored ones).
    Columns: ``fold``, ``method``, ``perturbation``, ``scored`` (held out, so compared with real
    cells), ``n_cells``, ``n_genes`` (genes in the file), ``n_modelled`` (genes the method predicted), ``file``.
    """
    from ccfm.io.h5ad import read_obs_labels, read_var

    rows = []
    for method, fold, path in entries:
        labels = pd.Series(read_obs_labels(path, PERT_COLUMN)).astype(str)
        var = read_var(path)
        modelled = modelled_mask(var)
        held_out = set(tests.get(str(fold), []))
        for label, n in labels[labels != control_label].value_counts(sort=False).items():
            rows.append(
                {
                    "fold": str(fold),
                    "method": method,
                    "perturbation": label,
                    "scored": label in held_out,
                    "n_cells": int(n),
                    "n_genes": int(var.shape[0]),
                    "n_modelled": int(var.shape[0] if modelled is None else modelled.sum()),
                    "file": str(path),
                }
            )
    return pd.DataFrame(
        rows, columns=["fold", "method", "perturbation", "scored", "n_cells", "n_genes", "n_modelled", "file"]
    )


def write_prediction_table(
    methods: Sequence[str],
    folds: Sequence[int | str],
    preds: Sequence[str | Path],
    splits: Mapping[str, str | Path],
    out_tsv: str | Path,
) -> pd.DataFrame:
    """The ``prediction_table`` rule: :func:`prediction_table` of every method and fold, written as TSV."""
    from ccfm.io.splits import read_split

    tests = {str(fold): list(read_split(path)["test"]) for fold, path in splits.items()}
    table = prediction_table(list(zip(methods, folds, preds)), tests)
    write_table_atomic(table, out_tsv, sep="\t", index=False)
    n_scored = int(table["scored"].sum())
    log.info(
        "%d predicted perturbation(s) per method and fold written to %s; %d of the rows are held out and scored%s",
        table.groupby(["fold", "method"]).size().max() if len(table) else 0,
        out_tsv,
        n_scored,
        "" if n_scored else " (nothing is held out: predictions only, no scores)",
    )
    return table


def predictions_headline(dataset: str, table_tsv: str | Path) -> str:
    """End-of-run lines of a predict-only dataset: what was predicted, on how many genes, and where."""
    table = pd.read_csv(table_tsv, sep="\t", dtype={"fold": str})
    lines = [f"{dataset}: predict only (split.heldout_fraction: 0): nothing held out, nothing scored ({table_tsv})"]
    for (fold, method), rows in table.groupby(["fold", "method"], sort=False):
        first = rows.iloc[0]
        lines.append(
            f"  fold {fold} {method:<9} {len(rows)} perturbations x {first['n_genes']} genes "
            f"({first['n_modelled']} modelled): {first['file']}"
        )
    return "\n".join(lines)
