"""Gene selection, streaming: ``normalize_total + log1p`` per row chunk, per-gene moments (pass 1),
Seurat-flavour binned dispersion and the top genes, and the column selector pass 2 writes with."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm

from ccfm.data.moments import RunningMoments
from ccfm.data.validation import (
    check_chunk_values,
)
from ccfm.io.h5ad import (
    iter_row_chunks,
    matrix_shape,
)

log = logging.getLogger(__name__)


def normalize_log1p(counts: sp.csr_matrix, totals: np.ndarray, target_sum: float) -> sp.csr_matrix:
    """``log1p(counts / total * target_sum)`` row-wise, keeping the sparsity pattern.

    ``totals`` are the per-cell library sizes over *all* genes (not only the kept ones), as in
    ``scanpy.pp.normalize_total``. Cells with zero total stay all-zero.
    """
    counts = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    scale = np.divide(target_sum, totals, out=np.zeros(totals.shape, dtype=np.float64), where=totals > 0)
    counts.data = np.log1p(counts.data * np.repeat(scale, np.diff(counts.indptr))).astype(np.float32)
    return counts


def gene_statistics(
    path: Path, layer: str | None, scale: str, target_sum: float, chunk_size: int
) -> tuple[np.ndarray, RunningMoments]:
    """Pass 1: library sizes per cell and moments of ``expm1(log1p-normalised)`` per gene."""
    n_obs, n_vars = matrix_shape(path, layer)
    totals = np.zeros(n_obs, dtype=np.float64)
    moments = RunningMoments.empty(n_vars)
    chunks = iter_row_chunks(path, chunk_size, layer)
    for start, chunk in tqdm(chunks, total=-(-n_obs // chunk_size), desc="gene statistics", unit="chunk"):
        check_chunk_values(chunk, path, start, layer)
        if scale == "counts":
            block_totals = np.asarray(chunk.sum(axis=1), dtype=np.float64).ravel()
            totals[start : start + chunk.shape[0]] = block_totals
            logged = normalize_log1p(chunk, block_totals, target_sum)
        else:
            logged = chunk
        linear = logged.copy()
        linear.data = np.expm1(linear.data.astype(np.float64))
        moments.update(linear)
    return totals, moments


def seurat_dispersion(mean: np.ndarray, var: np.ndarray, n_bins: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(log1p mean, binned normalised dispersion) per gene, Seurat flavour.

    Genes with zero dispersion get NaN (never selected); a gene alone in its bin gets 1, as in
    scanpy. Returns the values scanpy reports as ``means`` and ``dispersions_norm``.
    """
    mean = np.where(mean == 0, 1e-12, mean)
    dispersion = var / mean
    with np.errstate(divide="ignore"):
        log_dispersion = np.where(dispersion > 0, np.log(np.where(dispersion > 0, dispersion, 1.0)), np.nan)
    log_mean = np.log1p(mean)
    frame = pd.DataFrame({"mean": log_mean, "dispersion": log_dispersion})
    frame["bin"] = pd.cut(frame["mean"], bins=n_bins)
    stats = frame.groupby("bin", observed=True)["dispersion"].agg(avg="mean", dev="std")
    single = stats["dev"].isnull()
    stats.loc[single, "dev"] = stats.loc[single, "avg"]
    stats.loc[single, "avg"] = 0.0
    per_gene = stats.loc[frame["bin"]].to_numpy(dtype=np.float64)
    normalized = (frame["dispersion"].to_numpy() - per_gene[:, 0]) / per_gene[:, 1]
    return log_mean, normalized


def top_genes(dispersion_norm: np.ndarray, n_top: int, never_expressed: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the ``n_top`` genes with the largest normalised dispersion (NaN last).

    Genes without a dispersion are never selected: those never expressed (zero in every cell) and
    those with one value in every cell. ``never_expressed`` only words the log line.
    """
    score = np.where(np.isnan(dispersion_norm), -np.inf, dispersion_norm)
    finite = int(np.isfinite(score).sum())
    if n_top > finite:
        n_never = int(np.sum(never_expressed)) if never_expressed is not None else 0
        constant = score.size - finite - n_never
        log.warning(
            "%d of the input's %d genes are never expressed (zero in every cell)%s, so %d genes vary across "
            "cells; selecting those %d instead of n_top_genes=%d (the others are written back into every "
            "prediction file, see genes.tsv)",
            n_never,
            score.size,
            f" and {constant} have one value in every cell" if constant > 0 else "",
            finite,
            finite,
            n_top,
        )
    # Stable sort on the negated score: ties resolved by input order, reproducibly.
    order = np.argsort(-score, kind="stable")[: min(n_top, finite)]
    mask = np.zeros(score.size, dtype=bool)
    mask[order] = True
    return mask


def column_selector(source_index: np.ndarray, n_source: int) -> sp.csr_matrix:
    """Sparse matrix P with ``chunk @ P`` = the chunk's columns in the order of ``source_index``.

    ``source_index[j] = -1`` makes output column j all-zero (a gene absent from the input).
    """
    present = np.flatnonzero(source_index >= 0)
    return sp.csr_matrix(
        (np.ones(present.size, dtype=np.float32), (source_index[present], present)),
        shape=(n_source, source_index.size),
    )


@dataclass
class GeneSelection:
    """The genes a processed file keeps, and the per-gene values written to its ``var``.

    All arrays are over the input's genes; ``keep`` indexes the kept ones in input order.
    """

    keep: np.ndarray
    highly_variable: np.ndarray
    perturbed: np.ndarray
    log_mean: np.ndarray
    dispersion_norm: np.ndarray
    never_expressed: np.ndarray

    def var(self, var: pd.DataFrame) -> pd.DataFrame:
        """The input's ``var`` rows of the kept genes with the selection's columns."""
        out = var.iloc[self.keep].copy()
        out["highly_variable"] = self.highly_variable[self.keep]
        out["perturbed"] = self.perturbed[self.keep]
        out["mean_log"] = self.log_mean[self.keep]
        out["dispersion_norm"] = self.dispersion_norm[self.keep]
        return out

    def modelled(self) -> np.ndarray:
        """Boolean mask over the input's genes: kept (modelled) or not."""
        mask = np.zeros(self.highly_variable.size, dtype=bool)
        mask[self.keep] = True
        return mask


def select_genes(
    moments: RunningMoments, n_top_genes: int, genes: pd.Index, perturbed: list[str], requested: list[str]
) -> GeneSelection:
    """The ``n_top_genes`` most dispersed genes, every perturbed gene and every requested gene, in input order."""
    log_mean, dispersion_norm = seurat_dispersion(moments.mean, moments.variance())
    never_expressed = moments.mean == 0
    highly_variable = top_genes(dispersion_norm, n_top_genes, never_expressed)
    is_perturbed = genes.isin(perturbed)
    keep = np.flatnonzero(highly_variable | is_perturbed | genes.isin(requested))
    return GeneSelection(keep, highly_variable, is_perturbed, log_mean, dispersion_norm, never_expressed)
