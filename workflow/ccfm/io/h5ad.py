"""Streaming h5ad I/O: read metadata without X, iterate rows as CSR chunks, write CSR incrementally.

Real inputs are large (the Virtual Cell Challenge H1 file is 221k cells x 18k genes), so nothing
here ever materialises a whole expression matrix: readers yield row chunks, and
:class:`CSRH5adWriter` appends row chunks to resizable HDF5 datasets in the on-disk layout
AnnData reads (``encoding-type: csr_matrix``). Files are produced through
:func:`ccfm.io.atomic.atomic_output`, so an interrupted job leaves no file that looks complete.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ccfm import CONTROL_LABEL, PERT_COLUMN
from ccfm.config import section_defaults
from ccfm.io.atomic import atomic_output

log = logging.getLogger(__name__)

# Rows per streamed block of a matrix: the schema's `preprocess.chunk_size` default (one home for it).
CHUNK_SIZE: int = section_defaults("preprocess")["chunk_size"]

# HDF5 chunk of the nnz-long datasets: big enough for fast appends, small enough to index.
_NNZ_CHUNK = 1 << 18


class H5adFormatError(ValueError):
    """An h5ad file lacks an element or stores it in a layout this module cannot stream."""


def file_identity(path: str | Path) -> str:
    """``name:size:mtime_ns`` of a file: cheap to compute for multi-GB inputs.

    Nanosecond mtime (not seconds): a file rewritten within the same second with the same size
    (``X * 3`` keeps the byte count of an uncompressed h5ad) must still count as changed. A
    touched but identical file counts as changed too, which only costs a retraining.
    """
    stat = Path(path).stat()
    return f"{Path(path).name}:{stat.st_size}:{stat.st_mtime_ns}"


def _require(file: h5py.File, key: str, path: Path) -> Any:
    if key not in file:
        raise H5adFormatError(f"{path} has no '{key}' element; is it an AnnData .h5ad file?")
    return file[key]


def read_obs(path: str | Path) -> pd.DataFrame:
    """The ``obs`` table of an h5ad file, without reading X."""
    path = Path(path)
    with h5py.File(path, "r") as file:
        return ad.io.read_elem(_require(file, "obs", path))


def _dataframe_group(file: h5py.File, key: str, path: Path) -> h5py.Group | None:
    """The group of a dataframe element in anndata's current layout; None for older layouts."""
    element = _require(file, key, path)
    if isinstance(element, h5py.Group) and element.attrs.get("encoding-type") == "dataframe":
        return element
    return None


def read_obs_labels(path: str | Path, column: str) -> np.ndarray:
    """``obs[column]`` as an object array of str, without reading the rest of ``obs``.

    Labels are stored as a categorical, so the result holds one pointer per cell to its
    category's string (8 bytes a cell); reading the whole ``obs`` and ``astype(str)`` would
    also build the cell-name index and a new string per cell (~130 bytes a cell together).
    Missing values read as ``"nan"``, as ``astype(str)`` writes them.
    """
    path = Path(path)
    with h5py.File(path, "r") as file:
        obs = _dataframe_group(file, "obs", path)
        if obs is None:
            values = None
        elif column not in obs:
            columns = [str(c) for c in obs.attrs.get("column-order", [])]
            raise KeyError(f"{path}: obs has no column {column!r} (columns: {columns})")
        else:
            values = ad.io.read_elem(obs[column])
    if values is None:  # an old layout: anndata decodes the whole table
        values = read_obs(path)[column].array
    if isinstance(values, pd.Categorical):
        # Code -1 (missing) indexes the appended last entry.
        categories = np.append(np.asarray(values.categories.astype(str), dtype=object), "nan")
        return categories[values.codes]
    return pd.Series(values).astype(str).to_numpy(dtype=object)


def obs_columns(path: str | Path) -> list[str]:
    """The column names of ``obs``, without reading the columns."""
    path = Path(path)
    with h5py.File(path, "r") as file:
        obs = _dataframe_group(file, "obs", path)
        if obs is not None:
            return [str(c) for c in obs.attrs.get("column-order", [])]
    return [str(c) for c in read_obs(path).columns]


def read_obs_subset(path: str | Path, rows: np.ndarray, columns: list[str]) -> pd.DataFrame:
    """``obs[columns]`` of strictly increasing ``rows``, as str categoricals indexed by cell name.

    Columns the file lacks are left out. Each column is read as one pointer per cell
    (:func:`read_obs_labels`) and names only for ``rows``, so the whole table never exists.
    """
    rows = np.asarray(rows, dtype=np.int64)
    available = set(obs_columns(path))
    present = [column for column in columns if column in available]
    return pd.DataFrame(
        {column: pd.Categorical(read_obs_labels(path, column)[rows]) for column in present},
        index=pd.Index(read_obs_names(path, rows), dtype=str),
    )


def read_obs_names(path: str | Path, rows: np.ndarray) -> list[str]:
    """The cell names (``obs`` index) of strictly increasing ``rows``; other names are never read.

    Reading all names and keeping a scattered few would leave every name's memory pinned.
    """
    path = Path(path)
    rows = np.asarray(rows, dtype=np.int64)
    with h5py.File(path, "r") as file:
        obs = _dataframe_group(file, "obs", path)
        index = obs[obs.attrs["_index"]] if obs is not None else None
        if isinstance(index, h5py.Dataset) and h5py.check_string_dtype(index.dtype) is not None:
            rows = _checked_rows(rows, index.shape[0], "read_obs_names")
            return index.asstr()[rows].tolist() if rows.size else []
    return [str(name) for name in read_obs(path).index[rows]]


def read_var(path: str | Path) -> pd.DataFrame:
    """The ``var`` table of an h5ad file, without reading X."""
    path = Path(path)
    with h5py.File(path, "r") as file:
        return ad.io.read_elem(_require(file, "var", path))


def _matrix_element(file: h5py.File, layer: str | None, path: Path) -> Any:
    key = "X" if layer is None else f"layers/{layer}"
    return _require(file, key, path)


def matrix_shape(path: str | Path, layer: str | None = None) -> tuple[int, int]:
    """(n_obs, n_vars) of X or a layer, from the file's metadata."""
    path = Path(path)
    with h5py.File(path, "r") as file:
        element = _matrix_element(file, layer, path)
        if isinstance(element, h5py.Dataset):
            return tuple(int(n) for n in element.shape)  # type: ignore[return-value]
        return tuple(int(n) for n in element.attrs["shape"])  # type: ignore[return-value]


def has_layer(path: str | Path, layer: str) -> bool:
    """Whether ``layers/<layer>`` exists in the file."""
    with h5py.File(Path(path), "r") as file:
        return f"layers/{layer}" in file


@contextlib.contextmanager
def backed_matrix(path: str | Path, layer: str | None = None) -> Iterator[Any]:
    """X (or ``layers[layer]``) of an h5ad file, on disk, indexable by rows (``m[rows]``).

    Use this instead of ``anndata.read_h5ad(path, backed="r")``: anndata's backed mode keeps
    only X on disk and reads every *layer* into memory (``processed.h5ad`` carries
    ``layers["counts"]``, as large as X), so memory grows with the number of cells. A sparse
    element is returned as anndata's backed CSR/CSC dataset, a dense one as the h5py dataset;
    both read only the rows asked for. The file is closed when the block exits.
    """
    path = Path(path)
    with h5py.File(path, "r") as file:
        element = _matrix_element(file, layer, path)
        yield element if isinstance(element, h5py.Dataset) else ad.io.sparse_dataset(element)


def _row_reader(element: Any, path: Path):
    """A callable ``(start, stop) -> csr_matrix`` for a dense dataset or a sparse group."""
    if isinstance(element, h5py.Dataset):
        return lambda start, stop: sp.csr_matrix(element[start:stop])
    encoding = element.attrs.get("encoding-type", "")
    if encoding == "csr_matrix":
        data, indices, indptr = element["data"], element["indices"], element["indptr"]
        n_vars = int(element.attrs["shape"][1])

        def read_csr(start: int, stop: int) -> sp.csr_matrix:
            # Read only this block's slice of data/indices: memory stays proportional to the chunk.
            bounds = indptr[start : stop + 1].astype(np.int64)
            lo, hi = int(bounds[0]), int(bounds[-1])
            return sp.csr_matrix((data[lo:hi], indices[lo:hi], bounds - lo), shape=(stop - start, n_vars))

        return read_csr
    if encoding == "csc_matrix":
        # Row slices of CSC touch every column: correct but slow; anndata handles the gather.
        matrix = ad.io.sparse_dataset(element)
        return lambda start, stop: sp.csr_matrix(matrix[start:stop])
    raise H5adFormatError(f"{path}: matrix element has unsupported encoding {encoding!r}")


def _checked_rows(rows: np.ndarray, n_obs: int, caller: str) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= n_obs):
        raise ValueError(f"{caller}: 'rows' must be strictly increasing indices in [0, {n_obs})")
    return rows


def iter_row_chunks(
    path: str | Path, chunk_size: int, layer: str | None = None, *, rows: np.ndarray | None = None
) -> Iterator[tuple[int, sp.csr_matrix]]:
    """Yield ``(start, csr_chunk)`` over the rows of X (or ``layers[layer]``) of an h5ad file.

    ``start`` is the index of the chunk's first row in the file; the chunk holds rows
    ``start : start + chunk.shape[0]``. With ``rows`` (strictly increasing row indices), only
    those rows are returned, at most ``chunk_size`` per chunk, and ``start`` is the position of
    the chunk's first row within ``rows``. Memory use is one chunk, whatever the file size.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    path = Path(path)
    with h5py.File(path, "r") as file:
        element = _matrix_element(file, layer, path)
        read = _row_reader(element, path)
        n_obs = int(element.shape[0] if isinstance(element, h5py.Dataset) else element.attrs["shape"][0])
        if rows is None:
            for start in range(0, n_obs, chunk_size):
                yield start, read(start, min(start + chunk_size, n_obs)).astype(np.float32, copy=False)
            return
        rows = _checked_rows(rows, n_obs, "iter_row_chunks")
        # Walk the file in chunk_size blocks and keep the wanted rows of each block, so a
        # scattered selection never reads more than one block at a time.
        position = 0
        for block_start in range(0, n_obs, chunk_size):
            block_stop = min(block_start + chunk_size, n_obs)
            lo, hi = np.searchsorted(rows, [block_start, block_stop])
            if hi == lo:
                continue
            block = read(block_start, block_stop)
            yield position, block[rows[lo:hi] - block_start].astype(np.float32, copy=False)
            position += int(hi - lo)


def read_csr_rows(
    path: str | Path, rows: np.ndarray, chunk_size: int = CHUNK_SIZE, layer: str | None = None
) -> sp.csr_matrix:
    """The strictly increasing ``rows`` of X (or ``layers[layer]``) as one CSR float32 matrix.

    Memory is the result plus one ``chunk_size``-row block of the file. For a CSR element the
    result is sized up front from ``indptr`` and every block is read into one reused buffer:
    stacking per-block pieces instead interleaves small kept arrays with large freed ones, and
    the heap they fragment (never returned to the system) grew with the number of blocks, that
    is with the cells of the file. Dense and CSC elements are gathered through
    :func:`iter_row_chunks`.
    """
    path = Path(path)
    with h5py.File(path, "r") as file:
        element = _matrix_element(file, layer, path)
        if isinstance(element, h5py.Dataset) or element.attrs.get("encoding-type") != "csr_matrix":
            n_vars = matrix_shape(path, layer)[1]
            pieces = [chunk for _, chunk in iter_row_chunks(path, chunk_size, layer, rows=rows)]
            return (
                sp.vstack(pieces, format="csr", dtype=np.float32)
                if pieces
                else sp.csr_matrix((0, n_vars), dtype=np.float32)
            )
        n_obs, n_vars = (int(n) for n in element.attrs["shape"])
        rows = _checked_rows(rows, n_obs, "read_csr_rows")
        indptr = element["indptr"][:].astype(np.int64, copy=False)  # one integer per cell
        lengths = indptr[rows + 1] - indptr[rows]
        total = int(lengths.sum())
        index_dtype = np.int32 if max(total, n_vars) < 2**31 else np.int64
        out_indptr = np.zeros(rows.size + 1, dtype=index_dtype)
        np.cumsum(lengths, out=out_indptr[1:])
        data = np.empty(total, dtype=np.float32)
        indices = np.empty(total, dtype=index_dtype)
        # Per block: the selected rows [lo, hi) and the stored span [first, last) that holds them.
        blocks = []
        for block_start in range(0, n_obs, chunk_size):
            lo, hi = (int(i) for i in np.searchsorted(rows, [block_start, min(block_start + chunk_size, n_obs)]))
            if hi > lo:
                blocks.append((lo, hi, int(indptr[rows[lo]]), int(indptr[rows[hi - 1] + 1])))
        widest = max((last - first for _, _, first, last in blocks), default=0)
        stored_data, stored_indices = element["data"], element["indices"]
        data_buffer = np.empty(widest, dtype=stored_data.dtype)
        indices_buffer = np.empty(widest, dtype=stored_indices.dtype)
        for lo, hi, first, last in blocks:
            if last == first:
                continue
            stored_data.read_direct(data_buffer, np.s_[first:last], np.s_[0 : last - first])
            stored_indices.read_direct(indices_buffer, np.s_[first:last], np.s_[0 : last - first])
            out_lo, out_hi = int(out_indptr[lo]), int(out_indptr[hi])
            # Buffer position of every stored entry of rows lo..hi-1, in output order.
            offsets = np.repeat(indptr[rows[lo:hi]] - first - (out_indptr[lo:hi] - out_lo), lengths[lo:hi])
            positions = np.arange(out_hi - out_lo, dtype=np.int64) + offsets
            data[out_lo:out_hi] = data_buffer[positions]
            indices[out_lo:out_hi] = indices_buffer[positions]
    return sp.csr_matrix((data, indices, out_indptr), shape=(rows.size, n_vars))


@dataclass
class LabelledRows:
    """Rows of an h5ad file selected by their label, kept as CSR float32 (never dense as a whole)."""

    matrix: sp.csr_matrix
    genes: list[str]
    labels: np.ndarray
    cell_names: list[str]


def read_rows_with_labels(
    h5ad_path: str | Path,
    keep: Callable[[np.ndarray], np.ndarray],
    *,
    pert_column: str = PERT_COLUMN,
    chunk_size: int = CHUNK_SIZE,
) -> LabelledRows:
    """Cells whose ``obs[pert_column]`` passes ``keep`` (labels -> bool mask), read in row chunks.

    Only the selected rows are kept: memory is their CSR (:func:`read_csr_rows`) plus one chunk
    and one label pointer per cell of the file (:func:`read_obs_labels`), not the whole file or
    its ``obs`` table.
    """
    labels = read_obs_labels(h5ad_path, pert_column)
    rows = np.flatnonzero(keep(labels))
    genes = [str(g) for g in read_var(h5ad_path).index]
    if rows.size == 0:
        return LabelledRows(sp.csr_matrix((0, len(genes)), dtype=np.float32), genes, labels[rows], [])
    matrix = read_csr_rows(h5ad_path, rows, chunk_size)
    return LabelledRows(matrix, genes, labels[rows], read_obs_names(h5ad_path, rows))


def read_control_cells(
    h5ad_path: str | Path,
    control_label: str = CONTROL_LABEL,
    *,
    pert_column: str = PERT_COLUMN,
    chunk_size: int = CHUNK_SIZE,
    all_genes: bool = False,
) -> LabelledRows:
    """The control cells of an h5ad file (CSR float32, file order); raises if there are none.

    The other cells are never loaded, so memory follows the number of control cells. A file
    holding every gene of the input (``real.h5ad``, ``pred.h5ad``: ``var["modelled"]``, see
    :mod:`ccfm.data.gene_fill`) gives its modelled genes only, unless ``all_genes``.
    """
    rows = read_rows_with_labels(
        h5ad_path, lambda labels: labels == control_label, pert_column=pert_column, chunk_size=chunk_size
    )
    if rows.matrix.shape[0] == 0:
        raise ValueError(f"{h5ad_path}: no control cells ({pert_column} == {control_label!r})")
    modelled = modelled_mask(read_var(h5ad_path))
    if modelled is not None and not all_genes:
        genes = [g for g, keep in zip(rows.genes, modelled) if keep]
        return LabelledRows(rows.matrix[:, np.flatnonzero(modelled)].tocsr(), genes, rows.labels, rows.cell_names)
    return rows


MODELLED_COLUMN = "modelled"


def modelled_mask(var: pd.DataFrame) -> np.ndarray | None:
    """``var["modelled"]`` as booleans for a file carrying every input gene, else None (all modelled)."""
    if MODELLED_COLUMN not in var.columns:
        return None
    return var[MODELLED_COLUMN].astype(bool).to_numpy()


class CSRH5adWriter:
    """Write an AnnData h5ad whose X (and layers) are CSR matrices appended row chunk by chunk.

    Usage::

        with atomic_output(out) as tmp, CSRH5adWriter(tmp, var, layers=["counts"]) as writer:
            for chunk, counts in ...:
                writer.append(chunk, layers={"counts": counts})
            writer.finish(obs, uns={...})

    ``finish`` must be called with an ``obs`` frame of exactly the appended number of rows;
    a writer closed without ``finish`` raises, so no incomplete file is ever renamed into place.
    """

    def __init__(
        self, path: str | Path, var: pd.DataFrame, *, layers: tuple[str, ...] | list[str] = (), dtype: Any = np.float32
    ) -> None:
        self.path = Path(path)
        self.var = var
        self.n_vars = len(var)
        self.n_obs = 0
        self.dtype = np.dtype(dtype)
        self._file = h5py.File(self.path, "w")
        self._finished = False
        self._groups = {None: self._create_group("X")}
        layers_group = self._file.create_group("layers")
        layers_group.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        for name in layers:
            self._groups[name] = self._create_group(f"layers/{name}")

    def _create_group(self, key: str) -> h5py.Group:
        group = self._file.create_group(key)
        group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (0, self.n_vars)})
        group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=self.dtype, chunks=(_NNZ_CHUNK,))
        # int64 indices/indptr: large files (> 2^31 non-zeros) must not overflow.
        group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(_NNZ_CHUNK,))
        group.create_dataset("indptr", data=np.zeros(1, dtype=np.int64), maxshape=(None,), chunks=(65536,))
        return group

    @staticmethod
    def _append_csr(group: h5py.Group, chunk: sp.csr_matrix, dtype: np.dtype) -> None:
        data, indices, indptr = group["data"], group["indices"], group["indptr"]
        nnz0, rows0 = data.shape[0], indptr.shape[0] - 1
        nnz = int(chunk.nnz)
        data.resize((nnz0 + nnz,))
        indices.resize((nnz0 + nnz,))
        data[nnz0:] = chunk.data.astype(dtype, copy=False)
        indices[nnz0:] = chunk.indices
        indptr.resize((rows0 + chunk.shape[0] + 1,))
        indptr[rows0 + 1 :] = chunk.indptr[1:].astype(np.int64) + nnz0

    def append(
        self, chunk: sp.spmatrix | np.ndarray, layers: Mapping[str, sp.spmatrix | np.ndarray] | None = None
    ) -> None:
        """Append rows to X and, with ``layers``, the same rows to each declared layer."""
        chunk = sp.csr_matrix(chunk)
        if chunk.shape[1] != self.n_vars:
            raise ValueError(f"chunk has {chunk.shape[1]} columns, the file has {self.n_vars} genes")
        layers = dict(layers or {})
        if set(layers) != {k for k in self._groups if k is not None}:
            raise ValueError(
                f"append() needs exactly the layers {sorted(k for k in self._groups if k)}, got {sorted(layers)}"
            )
        chunk.sort_indices()
        self._append_csr(self._groups[None], chunk, self.dtype)
        for name, matrix in layers.items():
            matrix = sp.csr_matrix(matrix)
            if matrix.shape != chunk.shape:
                raise ValueError(f"layer {name!r} chunk shape {matrix.shape} != X chunk shape {chunk.shape}")
            matrix.sort_indices()
            self._append_csr(self._groups[name], matrix, self.dtype)
        self.n_obs += chunk.shape[0]

    def finish(self, obs: pd.DataFrame, uns: Mapping[str, Any] | None = None) -> None:
        """Write obs/var/uns and the AnnData header; the file is complete afterwards."""
        if len(obs) != self.n_obs:
            raise ValueError(f"obs has {len(obs)} rows but {self.n_obs} rows were appended")
        for group in self._groups.values():
            group.attrs["shape"] = (self.n_obs, self.n_vars)
        ad.io.write_elem(self._file, "obs", obs)
        ad.io.write_elem(self._file, "var", self.var)
        ad.io.write_elem(self._file, "uns", dict(uns or {}))
        for key in ("obsm", "varm", "obsp", "varp"):
            ad.io.write_elem(self._file, key, {})
        self._file.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        self._finished = True

    def close(self) -> None:
        """Close the HDF5 file (idempotent)."""
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> CSRH5adWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        if exc_type is None and not self._finished:
            raise RuntimeError(f"CSRH5adWriter for {self.path} closed without finish(obs): the file is incomplete")


def write_h5ad_atomic(adata: ad.AnnData, path: str | Path) -> Path:
    """Write a (small) in-memory AnnData to ``path`` atomically."""
    with atomic_output(path) as tmp:
        adata.write_h5ad(tmp)
    return Path(path)
