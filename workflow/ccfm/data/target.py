"""Target-context preprocessing: a second file (another cell line, e.g. H1) on exactly the genes of the
source's ``processed.h5ad``, normalised the same way (rule ``preprocess_target``).

Output layout: docs/architecture.md, ``target_processed.h5ad``.
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
from ccfm.config import load_schema, section_defaults
from ccfm.data.cell_labels import InputSettings, canonical_obs
from ccfm.data.conditions import summarize_conditions
from ccfm.data.gene_selection import column_selector
from ccfm.data.perturbed import validate_predict
from ccfm.data.scale import choose_matrix
from ccfm.data.validation import check_gene_names, check_readable_h5ad, check_target_gene_overlap
from ccfm.data.writing import InputMatrix, write_selected
from ccfm.io.h5ad import read_obs, read_obs_labels, read_var

log = logging.getLogger(__name__)

_PREPROCESS = section_defaults("preprocess")
_TARGET = load_schema()["$defs"]["dataset"]["properties"]["target"]["properties"]


@dataclass(frozen=True, kw_only=True)
class TargetSettings(InputSettings):
    """What ``preprocess_target`` does: the target's labels and scale (the dataset's unless its ``target:``
    block names its own), the ``preprocess`` section, the ``target.predict`` entries and the fraction of the
    source genes the target must measure (defaults: the schema's)."""

    dataset: str
    target_sum: float = _PREPROCESS["target_sum"]
    chunk_size: int = _PREPROCESS["chunk_size"]
    predict: Sequence[str] = ()
    min_shared_genes: float = _TARGET["min_shared_genes"]["default"]


def _gene_positions(target_var: pd.DataFrame, genes: pd.Index, target_raw: Path) -> np.ndarray:
    """Column of each of ``genes`` in the target file (-1: absent); a duplicated name's first column."""
    position = pd.Series(np.arange(target_var.shape[0]), index=target_var.index.astype(str))
    if position.index.has_duplicates:
        duplicated = sorted(set(position.index[position.index.duplicated()]))
        position = position[~position.index.duplicated(keep="first")]
        log.warning(
            "%s: %d duplicated gene names (%s); the first occurrence of each is used",
            target_raw,
            len(duplicated),
            ", ".join(duplicated[:10]),
        )
    return position.reindex(genes).fillna(-1).to_numpy(dtype=np.int64)


def _library_sizes(matrix: InputMatrix, n_obs: int) -> np.ndarray:
    """Each cell's total over all target genes (zeros when the target holds log1p values)."""
    totals = np.zeros(n_obs, dtype=np.float64)
    if matrix.scale == "counts":
        for start, chunk in matrix.chunks():
            totals[start : start + chunk.shape[0]] = np.asarray(chunk.sum(axis=1)).ravel()
    return totals


def _check_target_predict(settings: TargetSettings, processed: Path, genes: pd.Index, obs: pd.DataFrame) -> None:
    """``target.predict`` entries: drugs of the source or the target; genes the source cells measure or perturb."""
    source = pd.Series(read_obs_labels(processed, PERT_COLUMN))
    validate_predict(
        settings.predict,
        settings.perturbation_type,
        genes,
        pd.concat([source, obs[PERT_COLUMN].astype(str)]),
        where=f"{processed}: target 'predict:' of dataset {settings.dataset!r}",
        perturbed_source=source,
    )


def preprocess_target(
    target_raw: str | Path, processed: str | Path, out: str | Path, settings: TargetSettings
) -> dict[str, Any]:
    """Write ``target_processed.h5ad``: the target context on exactly the genes of ``processed``.

    Genes of ``processed`` absent from the target become all-zero columns (logged); fewer than
    ``min_shared_genes`` (a fraction) of them present is an error. Library sizes are taken over
    all target genes, as for the source, then the same ``normalize_total(target_sum) + log1p``
    is applied.
    """
    target_raw, processed, out = Path(target_raw), Path(processed), Path(out)
    check_readable_h5ad(target_raw)
    obs = canonical_obs(read_obs(target_raw), settings, target_raw)
    genes = read_var(processed).index.astype(str)
    target_var = read_var(target_raw)
    # Duplicated target genes are tolerated (the first occurrence is used); Ensembl ids are not.
    check_gene_names(target_var, target_raw, allow_duplicates=True)
    check_target_gene_overlap(
        list(genes), target_var.index.astype(str), target_raw, processed, settings.min_shared_genes
    )
    _check_target_predict(settings, processed, genes, obs)
    layer, scale = choose_matrix(target_raw, settings.input_scale)
    source_index = _gene_positions(target_var, genes, target_raw)
    missing = genes[source_index < 0].tolist()
    if missing:
        log.warning(
            "%d of %d genes of %s are absent from %s and are zero columns: %s%s",
            len(missing),
            len(genes),
            processed.name,
            target_raw,
            ", ".join(missing[:20]),
            " ..." if len(missing) > 20 else "",
        )
    matrix = InputMatrix(target_raw, layer, scale, settings.chunk_size)
    totals = _library_sizes(matrix, obs.shape[0])
    summary = {
        "dataset": settings.dataset,
        "context": "target",
        "input_scale": scale,
        "target_sum": float(settings.target_sum),
        "n_cells": int(obs.shape[0]),
        "n_genes": int(genes.size),
        "genes_absent": missing,
        "counts_available": scale == "counts",
        "conditions": summarize_conditions(obs[PERT_COLUMN].astype(str).tolist()),
    }
    out_var = pd.DataFrame({"present_in_target": source_index >= 0}, index=pd.Index(genes))
    selector = column_selector(source_index, target_var.shape[0])
    write_selected(matrix, out, selector, totals, settings.target_sum, obs, out_var, {"ccfm": summary})
    log.info("wrote %s: %d cells x %d genes (%d absent in target)", out, obs.shape[0], genes.size, len(missing))
    return summary
