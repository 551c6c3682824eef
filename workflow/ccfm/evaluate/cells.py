"""Metrics that see generated *cells*, not only their mean, each beside a real-vs-real floor.

A statistic of means cannot tell a model that returns the right mean with zero spread from one
that returns the right cells. These do:

- ``energy_distance``: the energy distance with plain Euclidean distances (Székely),
  ``2·E‖X−Y‖ − E‖X−X'‖ − E‖Y−Y'‖`` (V-statistic: diagonal included, so identical sets score
  exactly 0), in a fixed PCA space. It is zero only when the two distributions agree; with
  *squared* distances the same formula collapses to ``2·‖mean(X) − mean(Y)‖²`` (what
  :func:`ccfm.evaluate.metrics.squared_mean_shift` reports).
- ``mmd``: unbiased multi-scale RBF MMD² (:func:`ccfm.model.mmd.multiscale_rbf_mmd`, bandwidths
  from the pooled median distance) in the same PCA space.
- ``std_ratio``: median over variable genes of std(generated) / std(real); 1 is right, 0 is a
  point mass, < 1 is contracted cells.
- ``corr_error``: mean absolute difference of the off-diagonal gene–gene correlations of the
  generated and the real cells over the perturbation's top DE genes (a correlation of a constant
  gene is taken as 0).

The floor: the real cells of a perturbation are split into two random halves A and B; the floor
is the metric between A and B, and the method is scored against B with as many generated cells
as A has. Both sides then have the same cell counts, so a method that generates the real
distribution scores the floor in expectation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ccfm.model.mmd import multiscale_rbf_mmd

CELL_COLUMNS = [
    "energy_distance",
    "energy_distance_floor",
    "mmd",
    "mmd_floor",
    "std_ratio",
    "corr_error_top_de",
    "corr_error_floor",
]
# Genes whose real std is below this (log1p units) are not "variable" for the std ratio.
MIN_STD = 1e-3


def _pairwise_mean_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs (rows of ``x`` × rows of ``y``)."""
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return float(np.sqrt(np.maximum(sq, 0.0)).mean())


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Energy distance with Euclidean distances, ``2·E‖X−Y‖ − E‖X−X'‖ − E‖Y−Y'‖`` (≥ 0; 0 for identical sets)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) == 0 or len(y) == 0:
        return float("nan")
    return 2.0 * _pairwise_mean_distance(x, y) - _pairwise_mean_distance(x, x) - _pairwise_mean_distance(y, y)


def rbf_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased multi-scale RBF MMD² (the training/adaptation MMD) in float64; NaN below 2 cells a side."""
    if len(x) < 2 or len(y) < 2:
        return float("nan")
    tx = torch.from_numpy(np.asarray(x, dtype=np.float64))
    ty = torch.from_numpy(np.asarray(y, dtype=np.float64))
    return float(multiscale_rbf_mmd(tx, ty))


def std_ratio(generated: np.ndarray, real: np.ndarray, min_std: float = MIN_STD) -> float:
    """Median over genes with real std > ``min_std`` of std(generated) / std(real)."""
    real_std = np.asarray(real, dtype=np.float64).std(axis=0)
    variable = real_std > min_std
    if not variable.any() or len(generated) == 0:
        return float("nan")
    generated_std = np.asarray(generated, dtype=np.float64).std(axis=0)
    return float(np.median(generated_std[variable] / real_std[variable]))


def correlation_matrix(cells: np.ndarray) -> np.ndarray:
    """Gene–gene Pearson correlations (G, G); a constant gene correlates 0 with every other gene."""
    cells = np.asarray(cells, dtype=np.float64)
    centred = cells - cells.mean(axis=0)
    norm = np.sqrt((centred * centred).sum(axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = (centred.T @ centred) / np.outer(norm, norm)
    return np.where(np.isfinite(corr), corr, 0.0)


def correlation_error(generated: np.ndarray, real: np.ndarray) -> float:
    """Mean |corr(generated) − corr(real)| over the off-diagonal gene pairs (NaN for < 2 genes or cells)."""
    n_genes = np.asarray(real).shape[1]
    if n_genes < 2 or len(generated) < 2 or len(real) < 2:
        return float("nan")
    diff = np.abs(correlation_matrix(generated) - correlation_matrix(real))
    return float(diff[~np.eye(n_genes, dtype=bool)].mean())


@dataclass(frozen=True)
class SplitHalves:
    """Row indices of the two halves of a perturbation's real cells."""

    first: np.ndarray
    second: np.ndarray


def split_halves(n_cells: int, rng: np.random.Generator) -> SplitHalves:
    order = rng.permutation(n_cells)
    half = n_cells // 2
    return SplitHalves(np.sort(order[:half]), np.sort(order[half:]))


def cell_metrics(
    generated: np.ndarray,
    real: np.ndarray,
    project,
    de_genes: np.ndarray,
    rng: np.random.Generator,
    max_cells: int = 500,
) -> dict[str, float]:
    """The :data:`CELL_COLUMNS` of one perturbation.

    Args:
        generated: (n, G) generated cells; real: (m, G) real cells of the perturbation.
        project: maps (k, G) cells to the fixed PCA space (a fitted PCA's ``transform``).
        de_genes: indices of the perturbation's top DE genes (for the correlation error).
        rng: seeded generator for the split and subsamples.
        max_cells: at most this many real cells are used (seeded subsample), bounding the
            quadratic distance computations.
    """
    real = np.asarray(real, dtype=np.float64)
    generated = np.asarray(generated, dtype=np.float64)
    if len(real) > max_cells:
        real = real[np.sort(rng.choice(len(real), size=max_cells, replace=False))]
    halves = split_halves(len(real), rng)
    first, second = real[halves.first], real[halves.second]
    n = len(first)
    gen = generated if len(generated) <= n else generated[np.sort(rng.choice(len(generated), size=n, replace=False))]
    p_first, p_second, p_gen = project(first), project(second), project(gen)
    return {
        "energy_distance": energy_distance(p_gen, p_second),
        "energy_distance_floor": energy_distance(p_first, p_second),
        "mmd": rbf_mmd(p_gen, p_second),
        "mmd_floor": rbf_mmd(p_first, p_second),
        "std_ratio": std_ratio(generated, real),
        "corr_error_top_de": correlation_error(gen[:, de_genes], second[:, de_genes]),
        "corr_error_floor": correlation_error(first[:, de_genes], second[:, de_genes]),
    }
