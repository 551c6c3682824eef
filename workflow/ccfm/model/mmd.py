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


def _pooled_sq_distances(pooled: Tensor) -> Tensor:
    """Squared Euclidean distances between all rows of ``pooled`` (N, F)."""
    return torch.cdist(pooled, pooled).pow(2)


def median_distance(points: Tensor, *, min_distance: float = MIN_MEDIAN_DISTANCE) -> Tensor:
    """Median pairwise Euclidean distance of ``points`` (n, ...), never below ``min_distance`` (0-d, no gradient).

    Self-pairs are excluded. When more than half of the pairs are duplicates the plain median
    is 0, so the median of the distinct (non-zero) pairs is used instead; if every point is the
    same, ``min_distance`` is returned. Computed in the dtype of ``points``.
    """
    with torch.no_grad():
        flat = flatten(points.detach())
        n = flat.shape[0]
        if n < 2:
            return flat.new_tensor(min_distance)
        sq = _pooled_sq_distances(flat)
        off_diagonal = sq[~torch.eye(n, dtype=torch.bool, device=sq.device)].sqrt()
        median = off_diagonal.median()
        if median < min_distance:
            distinct = off_diagonal[off_diagonal > min_distance]
            if distinct.numel() > 0:
                median = distinct.median()
        return median.clamp(min=min_distance)


def bandwidths_from_median(median: float | Tensor, scales: Sequence[float] = BANDWIDTH_SCALES) -> tuple:
    """RBF bandwidths sigma = median × scale (floats, or 0-d tensors for a tensor median); the median must be > 0."""
    if not math.isfinite(float(median)) or float(median) <= 0:
        raise ValueError(f"bandwidth median must be finite and > 0, got {float(median)}")
    return tuple(median * scale for scale in scales)


def mmd2_unbiased(x: Tensor, y: Tensor, sigmas: Sequence[float | Tensor]) -> Tensor:
    """Unbiased estimate of MMD² between samples ``x`` (n, ...) and ``y`` (m, ...).

    Multi-scale RBF kernel (sum over ``sigmas`` of exp(-d² / (2 σ²))); the diagonal terms of the
    within-sample kernels are dropped, so the estimate is unbiased and may be slightly negative.
    Needs n, m ≥ 2.
    """
    x, y = flatten(x), flatten(y)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 samples per side, got {n} and {m}")
    sq = _pooled_sq_distances(torch.cat([x, y], dim=0))
    kernel = sum(torch.exp(-sq / (2 * sigma**2)) for sigma in sigmas)
    k_xx, k_yy, k_xy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    term_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    term_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return term_xx + term_yy - 2 * k_xy.mean()


def multiscale_rbf_mmd(x: Tensor, y: Tensor, sigmas: Sequence[float | Tensor] | None = None) -> Tensor:
    """Unbiased multi-scale RBF MMD²; bandwidths from the pooled median heuristic if not given."""
    if sigmas is None:
        sigmas = bandwidths_from_median(median_distance(torch.cat([flatten(x), flatten(y)], dim=0)))
    return mmd2_unbiased(x, y, sigmas)
