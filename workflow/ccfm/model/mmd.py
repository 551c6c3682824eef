"""The one MMD: unbiased squared maximum mean discrepancy with a multi-scale RBF kernel.

Bandwidths are the pooled median pairwise distance times :data:`BANDWIDTH_SCALES` (the median
heuristic), taken without gradient. Training uses it as the flow's distribution loss
(``train.mmd``), adaptation as the objective of the control shift.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

BANDWIDTH_SCALES: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
MIN_MEDIAN_DISTANCE = 1e-3


def flatten(x: Tensor) -> Tensor:
    """(n, ...) -> (n, F): one row per sample."""
    return x.reshape(x.shape[0], -1)


def pairwise_sq_distances(x: Tensor, y: Tensor) -> Tensor:
    """Squared Euclidean distances (n, m) between the rows of ``x`` (n, F) and ``y`` (m, F)."""
    x_norm = (x * x).sum(dim=1, keepdim=True)
    y_norm = (y * y).sum(dim=1, keepdim=True)
    # The expansion can go slightly negative from rounding; distances cannot.
    return (x_norm + y_norm.T - 2.0 * x @ y.T).clamp_min(0.0)


def median_distance(points: Tensor, *, min_distance: float = MIN_MEDIAN_DISTANCE) -> float:
    """Median pairwise Euclidean distance of ``points`` (n, ...), never below ``min_distance``.

    Self-pairs are excluded. When more than half of the pairs are duplicates the plain median
    is 0, so the median of the distinct (non-zero) pairs is used instead; if every point is the
    same, ``min_distance`` is returned.
    """
    flat = flatten(points.detach()).double()
    n = flat.shape[0]
    if n < 2:
        return float(min_distance)
    distances = pairwise_sq_distances(flat, flat).sqrt()
    off_diagonal = distances[~torch.eye(n, dtype=torch.bool, device=distances.device)]
    median = float(off_diagonal.median())
    if median < min_distance:
        distinct = off_diagonal[off_diagonal > min_distance]
        if distinct.numel() > 0:
            median = float(distinct.median())
    return max(median, float(min_distance))


def bandwidths_from_median(median: float, scales: Sequence[float] = BANDWIDTH_SCALES) -> tuple[float, ...]:
    """RBF bandwidths sigma = median × scale; raises if the median is not a positive number."""
    if not math.isfinite(median) or median <= 0:
        raise ValueError(f"bandwidth median must be finite and > 0, got {median}")
    return tuple(float(median * scale) for scale in scales)


def _rbf_kernel_sum(sq_distances: Tensor, sigmas: Sequence[float]) -> Tensor:
    """Sum over bandwidths of exp(-d² / (2 σ²))."""
    return sum(torch.exp(-sq_distances / (2.0 * sigma * sigma)) for sigma in sigmas)


def mmd2_unbiased(x: Tensor, y: Tensor, sigmas: Sequence[float]) -> Tensor:
    """Unbiased estimate of MMD² between samples ``x`` (n, ...) and ``y`` (m, ...).

    Multi-scale RBF kernel (sum over ``sigmas``); diagonal terms of the within-sample kernels
    are dropped, so the estimate is unbiased and may be slightly negative. Needs n, m ≥ 2.
    """
    x, y = flatten(x), flatten(y)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 samples per side, got {n} and {m}")
    k_xx = _rbf_kernel_sum(pairwise_sq_distances(x, x), sigmas)
    k_yy = _rbf_kernel_sum(pairwise_sq_distances(y, y), sigmas)
    k_xy = _rbf_kernel_sum(pairwise_sq_distances(x, y), sigmas)
    n_scales = len(sigmas)
    # The diagonal of an RBF kernel is exactly 1 per scale: subtract it instead of masking.
    term_xx = (k_xx.sum() - n_scales * n) / (n * (n - 1))
    term_yy = (k_yy.sum() - n_scales * m) / (m * (m - 1))
    return term_xx + term_yy - 2.0 * k_xy.mean()


def multiscale_rbf_mmd(x: Tensor, y: Tensor, sigmas: Sequence[float] | None = None) -> Tensor:
    """Unbiased multi-scale RBF MMD²; bandwidths from the pooled median heuristic if not given."""
    if sigmas is None:
        pooled = torch.cat([flatten(x), flatten(y)], dim=0)
        sigmas = bandwidths_from_median(median_distance(pooled))
    return mmd2_unbiased(x, y, sigmas)
