"""Streaming per-column moments: count, mean and sum of squared deviations, merged block by block."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass
class RunningMoments:
    """Per-column count, mean and M2 in float64, merged block by block (Chan et al.'s update)."""

    n: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> RunningMoments:
        return cls(0, np.zeros(dim), np.zeros(dim))

    def merge_moments(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        """Fold the moments of ``n_b`` more rows (their mean and M2) into the running totals."""
        if n_b == 0:
            return
        n_a, n = self.n, self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (n_a * n_b / n)
        self.n = n

    def merge(self, other: RunningMoments) -> None:
        """Fold another accumulator into this one."""
        if other.mean.shape != self.mean.shape:
            raise ValueError(f"cannot merge moments of {other.mean.shape[0]} columns into {self.mean.shape[0]}")
        self.merge_moments(other.n, other.mean, other.m2)

    def update(self, chunk: sp.spmatrix | np.ndarray) -> None:
        """Merge a block of rows (sparse or dense) from its column sums and sums of squares."""
        chunk = sp.csr_matrix(chunk)
        n_b = chunk.shape[0]
        if n_b == 0:
            return
        sums = np.asarray(chunk.sum(axis=0), dtype=np.float64).ravel()
        squares = np.asarray(chunk.multiply(chunk).sum(axis=0), dtype=np.float64).ravel()
        mean_b = sums / n_b
        self.merge_moments(n_b, mean_b, np.maximum(squares - n_b * mean_b**2, 0.0))

    def variance(self, ddof: int = 1) -> np.ndarray:
        """Per-column variance; ``ddof=1`` (unbiased, as scanpy's HVG statistics use) by default."""
        return self.m2 / max(self.n - ddof, 1)
