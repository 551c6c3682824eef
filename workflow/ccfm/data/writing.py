"""Pass 2 of preprocessing: the selected columns of an input, normalised and log1p-transformed, written
chunk by chunk to a CSR h5ad together with the raw counts (when the input holds counts)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm

from ccfm.data.gene_selection import normalize_log1p
from ccfm.data.validation import check_chunk_values
from ccfm.io.atomic import atomic_output
from ccfm.io.h5ad import CSRH5adWriter, iter_row_chunks, matrix_shape


@dataclass(frozen=True)
class InputMatrix:
    """The matrix of an input file that is read (X, or a layer), its scale and the rows read at a time."""

    path: Path
    layer: str | None
    scale: str
    chunk_size: int

    @property
    def n_chunks(self) -> int:
        return -(-matrix_shape(self.path, self.layer)[0] // self.chunk_size)

    def chunks(self) -> Iterator[tuple[int, sp.csr_matrix]]:
        """``(first row, chunk)`` in file order, each chunk's values checked (NaN, inf, negative)."""
        for start, chunk in iter_row_chunks(self.path, self.chunk_size, self.layer):
            check_chunk_values(chunk, self.path, start, self.layer)
            yield start, chunk


def write_selected(
    matrix: InputMatrix,
    out: Path,
    selector: sp.csr_matrix,
    totals: np.ndarray,
    target_sum: float,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    uns: dict[str, Any],
) -> None:
    """Normalise and write the columns ``chunk @ selector`` (and their raw counts) chunk by chunk, atomically.

    ``totals``: each cell's library size over all input genes (used when the input holds counts).
    """
    layers = ["counts"] if matrix.scale == "counts" else []
    with atomic_output(out) as tmp:
        with CSRH5adWriter(tmp, var, layers=layers) as writer:
            chunks = tqdm(matrix.chunks(), total=matrix.n_chunks, desc=f"writing {out.name}", unit="chunk")
            for start, chunk in chunks:
                if matrix.scale == "counts":
                    block_totals = totals[start : start + chunk.shape[0]]
                    counts = (chunk @ selector).tocsr()
                    writer.append(normalize_log1p(counts, block_totals, target_sum), layers={"counts": counts})
                else:
                    writer.append((chunk @ selector).tocsr())
            writer.finish(obs, uns=uns)
