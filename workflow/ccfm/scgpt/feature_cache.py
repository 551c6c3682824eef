"""Feature source for training: frozen scGPT features on the fly, or read from a disk cache.

scGPT is frozen, so the features of a training cell never change: they can be computed once and
read back every time the trainer draws that cell. On CPU this turns the dominant cost of a training
step (the transformer) into a memory-mapped read.

Cache layout (``cache_dir``, not a Snakemake output, safe to reuse across runs):

- ``cells.npy``     (N,) int64, sorted cell indices (rows of processed.h5ad) that are cached
- ``offsets.npy``   (N+1,) int64, token range of each cell in the two arrays below
- ``positions.npy`` (T,) int32, gene column of each token
- ``features.npy``  (T, D) float16, scGPT feature of each token (covered genes only)
- ``manifest.json`` what the cache was built from; written last, so its presence means complete

A cache whose manifest does not match the current model, gene panel, cell list and tokenisation
settings is rebuilt. Arrays are written under temporary names and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch

from ccfm.distributed import DistContext
from ccfm.io.atomic import write_text_atomic
from ccfm.io.h5ad import backed_matrix, file_identity
from ccfm.scgpt.calibration import iter_expression_batches
from ccfm.scgpt.extractor import ScGPTFeatureExtractor, TokenizedCell, scatter_features

log = logging.getLogger(__name__)

CacheMode = Literal["auto", "on", "off"]
CACHE_FILES = ("cells.npy", "offsets.npy", "positions.npy", "features.npy")
MANIFEST = "manifest.json"
CACHE_FORMAT_VERSION = 1
BYTES_PER_VALUE = 2  # float16


class OnTheFlySource:
    """Runs the extractor on the given expression every time."""

    def __init__(self, extractor: ScGPTFeatureExtractor) -> None:
        self.extractor = extractor
        self.mode = "off"

    def features(self, cell_indices: np.ndarray, expr: torch.Tensor) -> torch.Tensor:
        return self.extractor.extract(expr).to(expr.device)

    def covered_mask(self, cell_indices: np.ndarray, expr: torch.Tensor) -> torch.Tensor:
        return self.extractor.covered_mask(expr)


class CachedSource:
    """Reads features of cached cells from memory-mapped arrays; other cells go on the fly."""

    def __init__(self, extractor: ScGPTFeatureExtractor, cache_dir: Path) -> None:
        self.extractor = extractor
        self.cache_dir = Path(cache_dir)
        self.mode = "on"
        self.cells = np.load(self.cache_dir / "cells.npy", allow_pickle=False)
        self.offsets = np.load(self.cache_dir / "offsets.npy", allow_pickle=False)
        self.positions = np.load(self.cache_dir / "positions.npy", mmap_mode="r", allow_pickle=False)
        self.values = np.load(self.cache_dir / "features.npy", mmap_mode="r", allow_pickle=False)
        self.n_fallback = 0

    def _rows(self, cell_indices: np.ndarray) -> np.ndarray:
        """Cache row of each cell, -1 where the cell is not cached."""
        cell_indices = np.asarray(cell_indices, dtype=np.int64)
        if self.cells.size == 0:
            return np.full(cell_indices.shape, -1, dtype=np.int64)
        where = np.minimum(np.searchsorted(self.cells, cell_indices), self.cells.size - 1)
        return np.where(self.cells[where] == cell_indices, where, -1)

    def _cached_cell(self, row: int) -> tuple[TokenizedCell, torch.Tensor]:
        start, stop = int(self.offsets[row]), int(self.offsets[row + 1])
        positions = np.asarray(self.positions[start:stop], dtype=np.int64)
        feats = torch.from_numpy(np.asarray(self.values[start:stop], dtype=np.float32))
        cell = TokenizedCell(positions, self.extractor.gene_vocab_ids[positions], np.zeros(0, np.float32))
        return cell, feats

    def features(self, cell_indices: np.ndarray, expr: torch.Tensor) -> torch.Tensor:
        rows = self._rows(cell_indices)
        cells: list[TokenizedCell] = [None] * len(rows)  # type: ignore[list-item]
        feats: list[torch.Tensor] = [None] * len(rows)  # type: ignore[list-item]
        for i, row in enumerate(rows):
            if row >= 0:
                cells[i], feats[i] = self._cached_cell(int(row))
        missing = np.flatnonzero(rows < 0)
        if missing.size:
            # a cell outside the cached list (e.g. not a training cell): same features, computed now
            self.n_fallback += int(missing.size)
            fresh_cells, fresh_feats = self.extractor.extract_sparse(expr[torch.as_tensor(missing)])
            for i, cell, feat in zip(missing, fresh_cells, fresh_feats):
                cells[i], feats[i] = cell, feat.cpu()
        return scatter_features(cells, feats, self.extractor.n_genes, self.extractor.dim, expr.device)

    def covered_mask(self, cell_indices: np.ndarray, expr: torch.Tensor) -> torch.Tensor:
        return self.extractor.covered_mask(expr)


# ----------------------------------------------------------------------------- building


def _hash_array(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def model_fingerprint(model_dir: Path) -> str:
    """Identity of a checkpoint: directory name, args.json content, weight file size and mtime (ns)."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256((model_dir / "args.json").read_bytes())
    digest.update(file_identity(model_dir / "best_model.pt").encode())
    return f"{model_dir.resolve().name}:{digest.hexdigest()[:16]}"


def cache_manifest(extractor: ScGPTFeatureExtractor, processed_h5ad: Path, cell_indices: np.ndarray) -> dict[str, Any]:
    """Everything the cached features depend on."""
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "model": model_fingerprint(extractor.model_dir),
        "genes_hash": _hash_array(extractor.gene_vocab_ids.astype(np.int64)),
        "cells_hash": _hash_array(np.asarray(cell_indices, dtype=np.int64)),
        "n_cells": int(len(cell_indices)),
        # ns mtime: a same-size rewrite within one second (X * 3) must not reuse stale features
        "data": file_identity(processed_h5ad),
        "seed": extractor.seed,
        "max_tokens_per_cell": extractor.max_tokens_per_cell,
        "zero_tokens": extractor.zero_tokens,
        "dim": extractor.dim,
    }


def count_tokens(
    extractor: ScGPTFeatureExtractor, processed_h5ad: Path, cell_indices: np.ndarray, chunk: int = 4096
) -> np.ndarray:
    """Tokens per cell (non-zero mapped genes, or every mapped gene with ``zero_tokens``; capped)
    read from the sparse matrix, no model run."""
    counts = np.zeros(len(cell_indices), dtype=np.int64)
    mapped = extractor.mapped
    if extractor.zero_tokens:
        counts[:] = int(mapped.sum())
        cap = extractor.max_tokens_per_cell
        return counts if cap is None else np.minimum(counts, cap)
    # X only: anndata's backed mode would read layers["counts"] into memory.
    with backed_matrix(processed_h5ad) as matrix:
        for start in range(0, len(cell_indices), chunk):
            block = np.asarray(cell_indices[start : start + chunk])
            order = np.argsort(block, kind="stable")  # the on-disk reader wants sorted rows
            rows = matrix[block[order]]
            rows = sp.csr_matrix(rows) if sp.issparse(rows) else sp.csr_matrix(np.asarray(rows))
            rows.eliminate_zeros()
            # counts of positive entries in mapped columns
            positive = rows.multiply(rows > 0).tocsr()
            counts[start + order] = np.asarray((positive[:, mapped] != 0).sum(axis=1)).ravel()
    if extractor.max_tokens_per_cell is not None:
        counts = np.minimum(counts, extractor.max_tokens_per_cell)
    return counts


def estimate_cache_gb(n_tokens: int, dim: int) -> float:
    """Disk size of the cache: fp16 features plus int32 positions per token."""
    return n_tokens * (dim * BYTES_PER_VALUE + 4) / 1e9


def _manifest_matches(cache_dir: Path, manifest: dict[str, Any]) -> bool:
    path = cache_dir / MANIFEST
    if not path.is_file() or not all((cache_dir / name).is_file() for name in CACHE_FILES):
        return False
    try:
        return json.loads(path.read_text()) == json.loads(json.dumps(manifest))
    except json.JSONDecodeError:
        return False


def build_feature_cache(
    extractor: ScGPTFeatureExtractor,
    processed_h5ad: Path,
    cell_indices: np.ndarray,
    cache_dir: Path,
    counts: np.ndarray | None = None,
    batch_size: int = 64,
    dist: DistContext | None = None,
) -> Path:
    """Compute features of ``cell_indices`` once and store them (see the module docstring).

    In a multi-process run every rank calls this and extracts its own contiguous part of the
    cells into the shared memory-mapped arrays; rank 0 creates and finalises them.
    """
    dist = dist or DistContext()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cells = np.unique(np.asarray(cell_indices, dtype=np.int64))
    manifest = cache_manifest(extractor, processed_h5ad, cells)
    if counts is None or len(counts) != len(cells):
        counts = count_tokens(extractor, processed_h5ad, cells)
    offsets = np.zeros(len(cells) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    total = int(offsets[-1])
    tmp = {name: cache_dir / f".{name}.building.npy" for name in CACHE_FILES}
    if dist.is_main:
        (cache_dir / MANIFEST).unlink(missing_ok=True)  # invalidate first: a crash leaves no valid cache
        np.lib.format.open_memmap(tmp["positions.npy"], mode="w+", dtype=np.int32, shape=(total,)).flush()
        np.lib.format.open_memmap(
            tmp["features.npy"], mode="w+", dtype=np.float16, shape=(total, extractor.dim)
        ).flush()
    dist.barrier()
    positions = np.load(tmp["positions.npy"], mmap_mode="r+", allow_pickle=False)
    values = np.load(tmp["features.npy"], mmap_mode="r+", allow_pickle=False)
    first, last = dist.part(len(cells))
    row = first
    progress = "building scGPT feature cache" if dist.is_main else None
    for _, expr in iter_expression_batches(processed_h5ad, cells[first:last], batch_size, progress=progress):
        tokenized, feats = extractor.extract_sparse(expr)
        for cell, feat in zip(tokenized, feats):
            start, stop = offsets[row], offsets[row + 1]
            if stop - start != cell.n_tokens:
                raise RuntimeError(
                    f"token count mismatch for cell {cells[row]} ({cell.n_tokens} vs {stop - start}) while "
                    f"building {cache_dir}"
                )
            positions[start:stop] = cell.positions
            values[start:stop] = feat.cpu().numpy().astype(np.float16)
            row += 1
    positions.flush()
    values.flush()
    del positions, values
    dist.barrier()  # every part written
    if dist.is_main:
        np.save(tmp["cells.npy"], cells)
        np.save(tmp["offsets.npy"], offsets)
        for name in CACHE_FILES:
            os.replace(tmp[name], cache_dir / name)
        write_text_atomic(cache_dir / MANIFEST, json.dumps(manifest, indent=2))
        log.info(
            "feature cache for %d cells (%d tokens, %.3f GB) written to %s",
            len(cells),
            total,
            estimate_cache_gb(total, extractor.dim),
            cache_dir,
        )
    dist.barrier()  # the cache is in place for every rank
    return cache_dir


def make_latent_source(
    mode: CacheMode,
    extractor: ScGPTFeatureExtractor,
    processed_h5ad: str | Path,
    cell_indices: np.ndarray,
    cache_dir: str | Path,
    max_gb: float,
    dist: DistContext | None = None,
) -> OnTheFlySource | CachedSource:
    """The trainer's feature source: ``off`` on the fly, ``on`` cached, ``auto`` cached if it fits ``max_gb``.

    Multi-process runs: every rank calls this and gets the same answer; a cache is built jointly.
    """
    dist = dist or DistContext()
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"latent.cache must be auto, on or off, got {mode!r}")
    if mode == "off":
        log.info("scGPT feature cache off: features computed on the fly")
        return OnTheFlySource(extractor)
    processed_h5ad, cache_dir = Path(processed_h5ad), Path(cache_dir)
    cells = np.unique(np.asarray(cell_indices, dtype=np.int64))
    manifest = cache_manifest(extractor, processed_h5ad, cells)
    reusable = _manifest_matches(cache_dir, manifest)
    dist.barrier()  # every rank has looked before rank 0 may invalidate the cache
    if reusable:
        log.info("reusing scGPT feature cache in %s", cache_dir)
        return CachedSource(extractor, cache_dir)
    counts = count_tokens(extractor, processed_h5ad, cells)
    size_gb = estimate_cache_gb(int(counts.sum()), extractor.dim)
    log.info(
        "scGPT feature cache for %d training cells: %d tokens, estimated %.3f GB (limit latent.cache_max_gb=%s)",
        len(cells),
        int(counts.sum()),
        size_gb,
        max_gb,
    )
    if mode == "auto" and size_gb > max_gb:
        log.warning("feature cache would exceed latent.cache_max_gb: computing features on the fly instead")
        return OnTheFlySource(extractor)
    build_feature_cache(extractor, processed_h5ad, cells, cache_dir, counts=counts, dist=dist)
    return CachedSource(extractor, cache_dir)
