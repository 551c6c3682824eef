"""Streaming preprocessing: scale detection, normalize_total + log1p, HVGs, condition labels.

Two passes over the input, one row chunk at a time (memory flat in the number of cells):

1. per-cell library sizes and per-gene mean/variance of the normalised expression (merged
   across chunks with Chan's parallel formula), from which genes are ranked by Seurat-style
   binned normalised dispersion (as ``scanpy.pp.highly_variable_genes(flavor="seurat")``:
   dispersion = var/mean of ``expm1(log data)``, log-transformed, z-scored within 20 bins of
   log mean expression);
2. the selected columns (top ``n_top_genes`` ∪ every perturbed gene present) are normalised,
   log1p-transformed and appended to a CSR h5ad together with the raw counts.

This module runs them for the source dataset (:func:`preprocess_dataset`); the jobs live in
:mod:`ccfm.data.scale` (counts or log1p), :mod:`ccfm.data.cell_labels` (canonical labels),
:mod:`ccfm.data.perturbed` (perturbed genes, ``predict:`` entries), :mod:`ccfm.data.gene_selection`
(pass 1, the selection) and :mod:`ccfm.data.writing` (pass 2); :mod:`ccfm.data.target` brings a
target context onto the same genes. The functions other code uses are importable from here.

Output layout: docs/architecture.md, ``processed.h5ad``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ccfm import PERT_COLUMN
from ccfm.config import section_defaults
from ccfm.data.cell_labels import InputSettings, canonical_obs, relabel_case
from ccfm.data.conditions import perturbed_names, summarize_conditions
from ccfm.data.gene_fill import (
    LIBRARY_SIZE_COLUMN,
    describe_gene_counts,
    gene_counts,
    gene_status_table,
    write_gene_table,
)
from ccfm.data.gene_selection import GeneSelection, column_selector, gene_statistics, normalize_log1p, select_genes
from ccfm.data.perturbed import log_perturbed_status, perturbed_status, validate_predict, write_perturbed_status
from ccfm.data.scale import ScaleError, choose_matrix, detect_input_scale, resolve_input_scale
from ccfm.data.target import TargetSettings, preprocess_target
from ccfm.data.validation import (
    check_combo_separator,
    check_gene_names,
    check_readable_h5ad,
    predict_entry_genes,
    warn_doubles_missing_singles,
)
from ccfm.data.writing import InputMatrix, write_selected
from ccfm.io.h5ad import read_obs, read_var

__all__ = [
    "InputSettings",
    "PreprocessSettings",
    "ScaleError",
    "TargetSettings",
    "choose_matrix",
    "detect_input_scale",
    "normalize_log1p",
    "preprocess_dataset",
    "preprocess_target",
    "resolve_input_scale",
]

log = logging.getLogger(__name__)

_PREPROCESS = section_defaults("preprocess")


@dataclass(frozen=True, kw_only=True)
class PreprocessSettings(InputSettings):
    """What ``preprocess`` does with a dataset: the dataset's labels and scale, the ``preprocess``
    section (defaults: the schema's) and the ``predict:`` entries, whose genes are kept."""

    dataset: str
    n_top_genes: int = _PREPROCESS["n_top_genes"]
    target_sum: float = _PREPROCESS["target_sum"]
    chunk_size: int = _PREPROCESS["chunk_size"]
    predict: Sequence[str] = ()


@dataclass
class _Cells:
    """The input's canonical ``obs`` and ``var``, with what the label checks found."""

    obs: pd.DataFrame
    var: pd.DataFrame
    case_matched: dict[str, str]
    perturbed: list[str]  # perturbed names of the cells' labels
    status: dict[str, list[str]]
    requested: list[str]  # genes of the predict: entries to keep


def _read_cells(raw: Path, settings: PreprocessSettings) -> _Cells:
    """Read and check ``obs``/``var``, canonical labels, perturbed status and ``predict:`` (no matrix read)."""
    check_readable_h5ad(raw)
    obs = canonical_obs(read_obs(raw), settings, raw)
    var = read_var(raw)
    var.index = var.index.astype(str)
    check_gene_names(var, raw)
    gene_type = settings.perturbation_type == "gene"
    case_matched: dict[str, str] = {}
    if gene_type:
        obs, case_matched = relabel_case(obs, var.index, raw)
    names = perturbed_names(obs[PERT_COLUMN].astype(str).unique())
    if gene_type:
        unmeasured = [n for n in names if n not in set(var.index)]
        check_combo_separator(unmeasured, names, var.index, settings.combo_separator, raw)
    # Counted before the predict check so the log shows the counts even when it fails.
    named = [g for entry in settings.predict for g in predict_entry_genes(entry)]
    status = perturbed_status(names, var.index, named, settings.perturbation_type)
    log_perturbed_status(status, raw)
    where = f"{raw}: dataset {settings.dataset!r} 'predict:'"
    requested = validate_predict(settings.predict, settings.perturbation_type, var.index, obs[PERT_COLUMN], where=where)
    warn_doubles_missing_singles(obs[PERT_COLUMN].astype(str).unique(), raw, log)
    return _Cells(obs, var, case_matched, names, status, requested)


def _warn_absent(absent: list[str], n_perturbed: int) -> None:
    """Log the perturbed genes without an expression column (gene datasets)."""
    if absent:
        log.warning(
            "%d of %d perturbed genes are not in var_names: no expression column, embedded by learned "
            "perturbation rows of their own: %s%s",
            len(absent),
            n_perturbed,
            ", ".join(absent[:20]),
            " ..." if len(absent) > 20 else "",
        )


def _summary(
    settings: PreprocessSettings,
    cells: _Cells,
    matrix: InputMatrix,
    selection: GeneSelection,
    *,
    absent: list[str],
    conditions: dict[str, int],
    genes: dict[str, int],
) -> dict[str, Any]:
    """``uns["ccfm"]`` of ``processed.h5ad`` and the function's return value."""
    return {
        "dataset": settings.dataset,
        "input_scale": matrix.scale,
        "target_sum": float(settings.target_sum),
        "n_top_genes": int(settings.n_top_genes),
        "n_cells": int(cells.obs.shape[0]),
        "n_genes_input": int(cells.var.shape[0]),
        "n_genes": int(selection.keep.size),
        "n_highly_variable": int(selection.highly_variable.sum()),
        "n_perturbed_in_var": int(selection.perturbed.sum()),
        "perturbed_absent": absent,
        "perturbed_status": {name: len(genes) for name, genes in cells.status.items()},
        "case_matched": cells.case_matched,
        "counts_available": matrix.scale == "counts",
        "conditions": conditions,
        "input_layer": matrix.layer or "X",
        "genes": genes,
    }


def preprocess_dataset(
    raw: str | Path,
    out: str | Path,
    settings: PreprocessSettings,
    *,
    perturbed_genes_tsv: str | Path | None = None,
    genes_tsv: str | Path | None = None,
) -> dict[str, Any]:
    """Write ``processed.h5ad`` from a raw h5ad (see docs/architecture.md); return a summary.

    Selected genes are the ``n_top_genes`` most dispersed plus every perturbed gene present in
    ``var_names`` plus the genes of the ``predict`` entries, kept in input order. Perturbed
    genes absent from the input stay labels: the model embeds them with rows of their own
    (:mod:`ccfm.data.perturbations`). How many perturbed genes are measured, unmeasured but perturbed
    in the cells, and unmeasured and unseen is logged and written to ``perturbed_genes_tsv``; every
    input gene with its status (modelled, never expressed, not selected) to ``genes_tsv``
    (:mod:`ccfm.data.gene_fill`), and each cell's library size to ``obs["library_size"]``.
    The input is validated first (metadata, ``predict:`` entries, then every chunk's values
    during pass 1): a :class:`ccfm.data.validation.InputValidationError` names the file, the problem
    and the fix, and no output is written.
    """
    raw, out = Path(raw), Path(out)
    cells = _read_cells(raw, settings)
    conditions = summarize_conditions(cells.obs[PERT_COLUMN].astype(str).tolist())
    log.info("conditions: %s", conditions)
    layer, scale = choose_matrix(raw, settings.input_scale)
    log.info("%s: input scale %s (configured %s)", raw, scale, settings.input_scale)
    matrix = InputMatrix(raw, layer, scale, settings.chunk_size)
    totals, moments = gene_statistics(raw, layer, scale, settings.target_sum, settings.chunk_size)
    if scale == "counts" and np.any(totals == 0):
        log.warning("%d cells have zero counts; they stay all-zero after normalisation", int((totals == 0).sum()))
    selection = select_genes(moments, settings.n_top_genes, cells.var.index, cells.perturbed, cells.requested)
    absent = sorted(set(cells.perturbed) - set(cells.var.index))
    if settings.perturbation_type == "gene":
        _warn_absent(absent, len(cells.perturbed))
    gene_table = gene_status_table(cells.var.index, selection.modelled(), selection.never_expressed)
    genes_in = gene_counts(gene_table)
    log.info("%s: %s", raw, describe_gene_counts(genes_in))
    obs = cells.obs.copy()
    obs[LIBRARY_SIZE_COLUMN] = totals if scale == "counts" else np.nan
    summary = _summary(settings, cells, matrix, selection, absent=absent, conditions=conditions, genes=genes_in)
    selector = column_selector(selection.keep, cells.var.shape[0])
    write_selected(matrix, out, selector, totals, settings.target_sum, obs, selection.var(cells.var), {"ccfm": summary})
    if perturbed_genes_tsv is not None:
        write_perturbed_status(cells.status, perturbed_genes_tsv, cells.case_matched)
    if genes_tsv is not None:
        write_gene_table(gene_table, genes_tsv)
    log.info("wrote %s: %d cells x %d genes", out, obs.shape[0], selection.keep.size)
    return summary
