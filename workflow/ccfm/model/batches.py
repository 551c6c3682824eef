"""The data feeding CCFM's training loop: one perturbation's cells against unpaired controls.

Each step takes the cells of one training perturbation (targets) and as many randomly drawn
control cells (sources, *unpaired*), over a random window of ``infer_top_gene`` genes (as scDFM).
Latent models also get the target cells' frozen scGPT features through a :data:`LatentTargets`
callable (built by :mod:`ccfm.model.latent_targets`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from ccfm import CONTROL_LABEL
from ccfm.model.expression import ExpressionData

log = logging.getLogger(__name__)

# (target cell rows (B,), their full log1p expression (B, G_all)) -> normalised features (B, G_all, D).
LatentTargets = Callable[[np.ndarray, np.ndarray], Tensor]


@dataclass
class Batch:
    """One training step's cells: a single perturbation vs unpaired control cells."""

    label: str
    target_rows: np.ndarray
    control_rows: np.ndarray  # the network's control-cell input
    gene_window: np.ndarray  # sorted gene indices
    # Control cells the anchored flow starts from; None: the same cells as ``control_rows``.
    start_rows: np.ndarray | None = None

    @property
    def starts(self) -> np.ndarray:
        return self.control_rows if self.start_rows is None else self.start_rows


class PerturbationBatchSampler:
    """Draws :class:`Batch` es from a seeded numpy Generator (state saved in checkpoints)."""

    def __init__(
        self,
        data: ExpressionData,
        train_labels: Sequence[str],
        batch_size: int,
        window: int,
        rng: np.random.Generator,
        control_label: str = CONTROL_LABEL,
        separate_starts: bool = False,
    ) -> None:
        self.data = data
        self.separate_starts = separate_starts
        self.batch_size = batch_size
        self.window = min(window, data.n_genes)
        self.rng = rng
        self.control_rows = data.rows_of(control_label)
        if self.control_rows.size == 0:
            raise ValueError(f"no control cells labelled {control_label!r} in the processed data")
        self.rows = {label: data.rows_of(label) for label in train_labels}
        empty = [label for label, rows in self.rows.items() if rows.size == 0]
        if empty:
            log.warning("%d training perturbation(s) have no cells and are skipped: %s", len(empty), empty[:10])
        self.labels = sorted(label for label, rows in self.rows.items() if rows.size > 0 and label != control_label)
        if not self.labels:
            raise ValueError("no training perturbation has cells; check the split file against processed.h5ad")

    def _draw(self, rows: np.ndarray) -> np.ndarray:
        return self.rng.choice(rows, size=self.batch_size, replace=rows.size < self.batch_size)

    def sample(self) -> Batch:
        label = self.labels[int(self.rng.integers(len(self.labels)))]
        targets = self._draw(self.rows[label])
        controls = self._draw(self.control_rows)
        window = np.sort(self.rng.permutation(self.data.n_genes)[: self.window])
        starts = self._draw(self.control_rows) if self.separate_starts else None
        return Batch(label, targets, controls, window, starts)
