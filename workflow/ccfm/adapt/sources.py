"""Source control cells for the MMD shift: ``processed.h5ad``'s controls plus ``adapt.source_files``.

The adapter's original script pooled the control cells of several source screens (a list of h5ad
files). ``adapt.source_files`` lists such files; each one's control cells (its perturbation
column, canonical control label: ``ctrl``, ``control`` and the dataset's ``control_label`` all
count) are put on the model's genes by name and appended to the controls of ``processed.h5ad``:

* raw counts are normalised as ``preprocess`` does (library size over all the file's genes,
  ``normalize_total(target_sum)`` + ``log1p``); log1p files are used as they are (the scale is
  detected as for every input, :func:`ccfm.data.preprocess.choose_matrix`);
* model genes the file lacks are zero columns; fewer than ``min_shared_genes`` of them present
  is an error (:func:`ccfm.data.validation.check_target_gene_overlap`), as for a target file;
* only the control rows are read, chunk by chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ccfm import CONTROL_LABEL, PERT_COLUMN
from ccfm.data.target import TargetSettings
from ccfm.io.h5ad import (
    CHUNK_SIZE,
    LabelledRows,
    iter_row_chunks,
    read_control_cells,
    read_obs_labels,
    read_obs_names,
    read_var,
)

log = logging.getLogger(__name__)


def control_rows_of(path: str | Path, perturbation_column: str, control_label: str) -> np.ndarray:
    """Row indices of the control cells of an h5ad file (labels parsed as the pipeline parses them)."""
    from ccfm.data.conditions import parse_condition

    labels = read_obs_labels(path, perturbation_column).astype(str)
    unique = pd.unique(labels)
    is_control = {}
    for label in unique:
        try:
            is_control[label] = parse_condition(label, control_label=control_label).canonical == CONTROL_LABEL
        except ValueError:  # a label the parser rejects is no control
            is_control[label] = False
    return np.flatnonzero([is_control[label] for label in labels])


def read_source_file_controls(
    path: str | Path,
    genes: Sequence[str],
    *,
    perturbation_column: str = PERT_COLUMN,
    control_label: str = CONTROL_LABEL,
    input_scale: str = "auto",
    target_sum: float = TargetSettings.target_sum,
    min_shared_genes: float = TargetSettings.min_shared_genes,
    chunk_size: int = CHUNK_SIZE,
) -> LabelledRows:
    """The control cells of one extra source file on ``genes`` (log1p, CSR float32; module docstring)."""
    from ccfm.data.preprocess import choose_matrix, normalize_log1p
    from ccfm.data.validation import check_target_gene_overlap

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapt.source_files lists {path}, which does not exist")
    rows = control_rows_of(path, perturbation_column, control_label)
    if rows.size == 0:
        raise ValueError(
            f"{path} (adapt.source_files): no control cells ({perturbation_column} == {control_label!r}); "
            "list only files with control cells labelled like the dataset's"
        )
    names = read_var(path).index.astype(str)
    position = pd.Series(np.arange(names.size), index=names)
    position = position[~position.index.duplicated(keep="first")]
    check_target_gene_overlap(list(genes), position.index, path, Path("processed.h5ad"), min_shared_genes)
    source_index = position.reindex(list(genes)).fillna(-1).to_numpy(dtype=np.int64)
    present = np.flatnonzero(source_index >= 0)
    layer, scale = choose_matrix(path, input_scale)
    blocks = []
    for _, chunk in iter_row_chunks(path, chunk_size, layer, rows=rows):
        if scale == "counts":
            chunk = normalize_log1p(chunk, np.asarray(chunk.sum(axis=1), dtype=np.float64).ravel(), target_sum)
        picked = chunk[:, source_index[present]].tocoo()
        blocks.append(
            sp.csr_matrix(
                (picked.data, (picked.row, present[picked.col])), shape=(chunk.shape[0], len(genes)), dtype=np.float32
            )
        )
    matrix = sp.vstack(blocks, format="csr", dtype=np.float32)
    log.info(
        "%s: %d control cells (%s), %d of %d model genes present",
        path,
        matrix.shape[0],
        scale,
        present.size,
        len(genes),
    )
    return LabelledRows(
        matrix=matrix,
        genes=[str(g) for g in genes],
        labels=np.full(matrix.shape[0], CONTROL_LABEL),
        cell_names=[f"{path.name}:{name}" for name in read_obs_names(path, rows)],
    )


def read_source_controls(
    processed_h5ad: str | Path,
    source_files: Sequence[str | Path] = (),
    *,
    processed_control_label: str = CONTROL_LABEL,
    chunk_size: int = CHUNK_SIZE,
    **file_options,
) -> LabelledRows:
    """Controls of ``processed.h5ad`` followed by those of every ``source_files`` entry, on its genes.

    ``file_options`` (``perturbation_column``, ``control_label``, ``input_scale``, ``target_sum``,
    ``min_shared_genes``) say how the extra files are read (:func:`read_source_file_controls`).
    """
    base = read_control_cells(processed_h5ad, control_label=processed_control_label, chunk_size=chunk_size)
    if not source_files:
        return base
    parts = [base] + [
        read_source_file_controls(path, base.genes, chunk_size=chunk_size, **file_options) for path in source_files
    ]
    log.info(
        "source controls: %d from %s + %d from %d extra file(s)",
        base.matrix.shape[0],
        processed_h5ad,
        sum(p.matrix.shape[0] for p in parts[1:]),
        len(source_files),
    )
    return LabelledRows(
        matrix=sp.vstack([p.matrix for p in parts], format="csr", dtype=np.float32),
        genes=base.genes,
        labels=np.concatenate([p.labels for p in parts]),
        cell_names=[name for p in parts for name in p.cell_names],
    )
