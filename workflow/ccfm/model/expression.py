"""Expression rows in memory: the processed log1p matrix (CSR) with every cell's label, and its moments."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ccfm import PERT_COLUMN
from ccfm.io.h5ad import read_csr_rows, read_obs_labels, read_var


@dataclass
class ExpressionData:
    """Rows of the processed log1p matrix (CSR, never densified whole) with every cell's label.

    ``matrix`` may hold only some cells of the file (``file_rows``, sorted); rows are always
    addressed by their row number in ``processed.h5ad``, so feature caches and samplers agree.
    """

    matrix: sp.csr_matrix
    genes: list[str]
    labels: np.ndarray  # canonical target_gene of every cell of the file
    # Rows of the file held in `matrix` (None: all); keyword-only so subclasses add fields freely.
    file_rows: np.ndarray | None = field(default=None, kw_only=True)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def rows_of(self, label: str) -> np.ndarray:
        """File rows of ``label``'s cells (only those held in ``matrix``)."""
        rows = np.flatnonzero(self.labels == label)
        if self.file_rows is not None:
            rows = rows[np.isin(rows, self.file_rows)]
        return rows

    def dense_rows(self, rows: np.ndarray) -> np.ndarray:
        """Dense float32 (len(rows), G) block of the requested cells (one batch at a time)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.file_rows is not None:
            positions = np.searchsorted(self.file_rows, rows)
            if np.any(positions >= self.file_rows.size) or np.any(
                self.file_rows[np.minimum(positions, self.file_rows.size - 1)] != rows
            ):
                raise IndexError("requested cells that were not loaded (only training perturbations and controls are)")
            rows = positions
        return np.asarray(self.matrix[rows].toarray(), dtype=np.float32)


def load_expression(
    processed_h5ad: str | Path, pert_col: str = PERT_COLUMN, keep_labels: Sequence[str] | None = None
) -> ExpressionData:
    """Read ``X`` (CSR), ``obs[pert_col]`` and ``var_names`` of ``processed.h5ad``.

    With ``keep_labels`` only the cells of those perturbations are read (training reads its
    training perturbations and the controls, not the held-out cells). Layers (raw counts) are
    not touched, so memory is one CSR copy of the kept cells' log1p rows.
    """
    path = Path(processed_h5ad)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run the preprocess rule first")
    try:
        labels = read_obs_labels(path, pert_col).astype(str)
    except KeyError as error:
        raise KeyError(f"{error.args[0]}; rerun preprocess") from None
    genes = [str(g) for g in read_var(path).index]
    if keep_labels is None:
        return ExpressionData(read_csr_rows(path, np.arange(labels.size)), genes, labels)
    rows = np.flatnonzero(np.isin(labels, np.asarray(list(keep_labels), dtype=str)))
    return ExpressionData(read_csr_rows(path, rows), genes, labels, file_rows=rows)


def row_moments(data: ExpressionData, rows: np.ndarray, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and unbiased variance (G,) of the given file rows, read ``chunk`` rows at a time."""
    total = np.zeros(data.n_genes, dtype=np.float64)
    squares = np.zeros(data.n_genes, dtype=np.float64)
    for start in range(0, rows.size, chunk):
        block = data.dense_rows(rows[start : start + chunk]).astype(np.float64)
        total += block.sum(axis=0)
        squares += np.square(block).sum(axis=0)
    n = max(rows.size, 1)
    mean = total / n
    variance = np.maximum(squares / n - np.square(mean), 0.0) * n / max(n - 1, 1)
    return mean, variance


def label_means(
    data: ExpressionData, labels: Sequence[str], chunk: int = 2048
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Pseudobulk mean log1p profile (G,) of each label's loaded cells and the sampling variance
    of that mean (per-gene variance / cells)."""
    means: dict[str, np.ndarray] = {}
    noise: dict[str, np.ndarray] = {}
    for label in labels:
        rows = data.rows_of(label)
        if rows.size == 0:
            continue
        means[label], variance = row_moments(data, rows, chunk)
        noise[label] = variance / rows.size
    return means, noise
