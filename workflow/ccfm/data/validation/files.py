"""Checks of the file itself: readable h5ad, cells and genes present, supported dtypes, and the values
of every row chunk the streaming passes read (negative, NaN, infinite)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ccfm.data.validation.errors import (
    EmptyInputError,
    InvalidValuesError,
    UnreadableInputError,
    UnsupportedDtypeError,
)

log = logging.getLogger(__name__)


def _supported_dtype(dtype: np.dtype) -> bool:
    """Whether scipy.sparse and the streaming readers handle ``dtype`` (float16 is not handled)."""
    return dtype.kind in "iub" or dtype in (np.dtype(np.float32), np.dtype(np.float64))


def check_readable_h5ad(path: Path) -> None:
    """Raise :class:`UnreadableInputError` unless ``path`` is an HDF5 file holding obs, var and X."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise UnreadableInputError(
            f"{path}: the input file does not exist. Fix: check the dataset's 'path:' in config/config.yaml."
        )
    problem = None
    if path.stat().st_size == 0:
        problem = "the file is empty"
    elif not h5py.is_hdf5(path):
        problem = "the file is not an HDF5/h5ad file (truncated download, or another format such as .loom/.csv/.rds?)"
    else:
        try:
            with h5py.File(path, "r") as file:
                missing = [key for key in ("obs", "var", "X") if key not in file]
        except OSError as error:  # a truncated HDF5 file often opens but fails here
            missing, problem = [], f"HDF5 cannot read it ({error}): truncated or corrupted"
        if missing:
            problem = f"the HDF5 file has no {', '.join(missing)}: it is not an AnnData .h5ad file"
    if problem:
        raise UnreadableInputError(
            f"{path}: {problem}. Fix: delete it and download/export it again (AnnData: adata.write_h5ad)."
        )
    check_not_empty(path)
    check_matrix_dtypes(path)


# The matrices preprocessing reads: X, and the raw counts layer when X is log1p.
_READ_ELEMENTS = ("X", "layers/counts")


def _matrix_elements(path: Path) -> dict[str, Any]:
    """The matrices preprocessing reads, as ``name -> (shape, dtype)`` from the metadata."""
    import h5py

    found: dict[str, Any] = {}
    with h5py.File(path, "r") as file:
        for name in _READ_ELEMENTS:
            if name not in file:
                continue
            element = file[name]
            if isinstance(element, h5py.Dataset):
                found[name] = (tuple(int(n) for n in element.shape), element.dtype)
            elif "data" in element and "shape" in element.attrs:
                found[name] = (tuple(int(n) for n in element.attrs["shape"]), element["data"].dtype)
    return found


def check_not_empty(path: Path) -> None:
    """Raise :class:`EmptyInputError` if X has no cells or no genes (from the metadata only)."""
    shape, _ = _matrix_elements(Path(path)).get("X", ((1, 1), None))
    if len(shape) == 2 and 0 in shape:
        what = "no cells (0 rows)" if shape[0] == 0 else "no genes (0 columns)"
        raise EmptyInputError(
            f"{path}: the file is empty: X has shape {shape[0]} x {shape[1]}, {what}. The pipeline "
            f"needs the cells of the experiment. Fix: check that 'path:'/'url:' names the right file "
            f"in config/config.yaml, and that filtering before export did not drop every cell or gene."
        )


def check_matrix_dtypes(path: Path) -> None:
    """Raise :class:`UnsupportedDtypeError` if X or layers['counts'] is float16, complex or non-numeric.

    Other layers are never read, so their dtype does not matter.

    Checked from the metadata, before any row is read: scipy.sparse cannot hold float16, so the
    streaming passes would otherwise stop with a scipy trace at their first chunk.
    """
    for name, (_, dtype) in _matrix_elements(Path(path)).items():
        if _supported_dtype(np.dtype(dtype)):
            continue
        target = "adata.X" if name == "X" else f"adata.layers[{name.split('/', 1)[1]!r}]"
        raise UnsupportedDtypeError(
            f"{path}: {name} is stored as {np.dtype(dtype)}, which the pipeline cannot read "
            f"(scipy sparse matrices support float32/float64 and integer types, not float16). "
            f"Fix: convert and write the file again: {target} = {target}.astype('float32'); "
            f"adata.write_h5ad(...). float32 keeps every float16 value exactly."
        )


def check_chunk_values(chunk: sp.spmatrix | np.ndarray, path: Path, start: int, layer: str | None = None) -> None:
    """Raise :class:`InvalidValuesError` if a row chunk has NaN, inf or negative values.

    ``start`` is the file row of the chunk's first row, so the message names the cell row.
    Only the stored values are scanned (the sparse ``data`` array): cost O(nnz of the chunk).
    """
    values = chunk.data if sp.issparse(chunk) else np.asarray(chunk)
    where = f"{path} ({'X' if layer is None else 'layers/' + layer})"
    if values.size == 0:
        return
    finite = np.isfinite(values)
    if not finite.all():
        rows = _bad_rows(chunk, ~finite)
        raise InvalidValuesError(
            f"{where}: {int((~finite).sum())} NaN/infinite values in rows {start + rows[0]}..{start + rows[-1]} "
            f"(e.g. row {start + rows[0]}). Expression values must be finite. Fix: remove or repair "
            f"these cells (adata.X.data[~np.isfinite(adata.X.data)] = 0 if they are missing counts) "
            f"and write the file again."
        )
    negative = values < 0
    if negative.any():
        rows = _bad_rows(chunk, negative)
        raise InvalidValuesError(
            f"{where}: {int(negative.sum())} negative values (min {float(values.min()):.3g}) in rows "
            f"{start + rows[0]}..{start + rows[-1]}: the data look scaled/z-scored or batch-corrected. "
            f"Fix: provide raw counts (preferred) or log1p-normalised values, e.g. from "
            f"adata.layers['counts'] or adata.raw."
        )


def _bad_rows(chunk: sp.spmatrix | np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sorted row indices (within the chunk) of the flagged stored values."""
    if sp.issparse(chunk):
        csr = sp.csr_matrix(chunk)
        row_of_value = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
        return np.unique(row_of_value[mask])
    return np.unique(np.nonzero(np.atleast_2d(mask))[0])
