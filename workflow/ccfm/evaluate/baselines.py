"""Reference predictors scored beside CCFM: no-change, additive and mean-perturbation.

All three start from real control cells and move them by a per-gene shift on the log1p scale, so
they produce cell-level predictions in the same file format as the model (see
:mod:`ccfm.io.predictions`) and cell-eval can score them the same way:

- ``nochange``: the sampled control cells unchanged (delta 0).
- ``additive``: delta = Σ over the double's singles of (single mean − control mean), the
  classic "sum of single effects" baseline of Norman et al. / GEARS. It needs the singles'
  training means; where one is missing the perturbation falls back to ``nochange`` and is
  recorded in ``uns["ccfm_baseline"]["fallback_nochange"]``.
- ``meanpert``: delta = mean over training perturbations of (perturbation mean − control mean),
  every perturbation weighted equally (a perturbation with many cells must not dominate).

Shifted cells are clamped at 0 (log1p expression cannot be negative), and the additive and
mean-perturbation cells are re-centred so that their mean is exactly the baseline's mean
(control mean + delta, floored at 0): a plain clamp would raise the mean of every gene with many
zeros, and the baselines must be as strong as their definition. Means are computed from
``processed.h5ad`` in row chunks read in backed mode, so the expression matrix is never densified.
Only training perturbations (the fold's ``train`` list) and controls enter the means: a held-out
double never leaks into its own baseline.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ccfm import COMBO_SEPARATOR, CONTROL_LABEL, PERT_COLUMN
from ccfm.config import section_defaults
from ccfm.data.conditions import conditions_to_predict, parse_condition
from ccfm.io.atomic import write_table_atomic
from ccfm.io.h5ad import CHUNK_SIZE, backed_matrix, read_control_cells, read_obs_labels, read_var, write_h5ad_atomic
from ccfm.io.predictions import build_prediction_anndata, prediction_means
from ccfm.io.splits import read_split
from ccfm.model.mean_model import match_mean

log = logging.getLogger(__name__)

BASELINE_METHODS = ("nochange", "additive", "meanpert")


@dataclass(frozen=True)
class BaselineOptions:
    """What a baseline predicts beyond the fold's held-out perturbations, and how many cells each.

    ``extra_labels``: the dataset's ``predict:`` labels; ``seed`` draws the control cells that are
    shifted (one draw per fold, shared by all baselines); ``chunk_size`` rows per streamed block.
    """

    extra_labels: Sequence[str] = ()
    cells_per_perturbation: int = section_defaults("generate")["cells_per_perturbation"]
    seed: int = 0
    chunk_size: int = CHUNK_SIZE


@dataclass
class ConditionMeans:
    """Mean log1p expression per condition, with the number of cells behind each mean."""

    genes: list[str]
    means: dict[str, np.ndarray] = field(default_factory=dict)
    n_cells: dict[str, int] = field(default_factory=dict)

    def delta(self, condition: str, control_label: str = CONTROL_LABEL) -> np.ndarray:
        """Mean shift of ``condition`` relative to the controls (log1p scale)."""
        return self.means[condition] - self.means[control_label]


def _row_block(matrix, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of a (possibly backed) matrix as CSR float64."""
    block = matrix[start:stop]
    return sp.csr_matrix(block, dtype=np.float64)


def condition_means(
    h5ad_path: str | Path,
    conditions: Iterable[str],
    pert_col: str = PERT_COLUMN,
    chunk_size: int = CHUNK_SIZE,
) -> ConditionMeans:
    """Per-condition mean of ``X`` over the rows of ``h5ad_path`` labelled with one of ``conditions``.

    Streams the file in backed mode, ``chunk_size`` rows at a time; per chunk, an indicator matrix
    (conditions × rows) times the sparse rows accumulates the sums, so memory is
    O(n_conditions × n_genes + chunk) whatever the number of cells.
    """
    h5ad_path = Path(h5ad_path)
    wanted = list(dict.fromkeys(conditions))
    try:
        labels = read_obs_labels(h5ad_path, pert_col)
    except KeyError:
        raise KeyError(
            f"{h5ad_path}: obs has no {pert_col!r} column; run preprocess to create the canonical labels"
        ) from None
    genes = [str(g) for g in read_var(h5ad_path).index]
    row_condition = pd.Index(wanted).get_indexer(labels)  # -1: a row of no wanted condition
    sums = np.zeros((len(wanted), len(genes)), dtype=np.float64)
    # X only: anndata's backed mode would read layers["counts"] into memory.
    with backed_matrix(h5ad_path) as matrix:
        for start in range(0, labels.size, chunk_size):
            stop = min(start + chunk_size, labels.size)
            codes = row_condition[start:stop]
            keep = np.flatnonzero(codes >= 0)
            if keep.size == 0:
                continue
            indicator = sp.csr_matrix((np.ones(keep.size), (codes[keep], keep)), shape=(len(wanted), stop - start))
            sums += np.asarray((indicator @ _row_block(matrix, start, stop)).todense())
    counts = np.bincount(row_condition[row_condition >= 0], minlength=len(wanted))
    absent = [name for name, n in zip(wanted, counts) if n == 0]
    if absent:
        raise ValueError(
            f"{h5ad_path}: no cells for condition(s) {absent[:10]} listed in the split; the split "
            "file and processed.h5ad are out of sync — rerun the split rule"
        )
    means = {name: sums[i] / counts[i] for i, name in enumerate(wanted)}
    return ConditionMeans(genes=genes, means=means, n_cells={w: int(c) for w, c in zip(wanted, counts)})


def additive_delta(condition: str, means: ConditionMeans, control_label: str = CONTROL_LABEL) -> np.ndarray | None:
    """Σ of the single-perturbation deltas of ``condition``; ``None`` when a single has no training mean."""
    parts = parse_condition(condition, control_label=control_label).perturbations
    if not parts or any(part not in means.means for part in parts):
        return None
    return np.sum([means.delta(part, control_label) for part in parts], axis=0)


def mean_perturbation_delta(
    means: ConditionMeans, training: Sequence[str], control_label: str = CONTROL_LABEL
) -> np.ndarray:
    """Unweighted mean over training perturbations of (perturbation mean − control mean)."""
    perts = [p for p in training if p != control_label]
    if not perts:
        raise ValueError("the split's train list has no perturbation; the mean-perturbation baseline needs one")
    return np.mean([means.delta(p, control_label) for p in perts], axis=0)


def sample_control_rows(n_controls: int, conditions: Sequence[str], n_cells: int, seed: int) -> dict[str, np.ndarray]:
    """Indices of the control cells each predicted condition starts from.

    Draws without replacement when there are enough controls (with replacement otherwise). The
    draw depends only on ``seed`` and the sorted condition list, not on the method, so all
    baselines shift the very same control cells and differ only by their delta.
    """
    rng = np.random.default_rng(seed)
    replace = n_controls < n_cells
    return {cond: rng.choice(n_controls, size=n_cells, replace=replace) for cond in sorted(conditions)}


def shifted_cells(
    control_block: sp.csr_matrix | np.ndarray, delta: np.ndarray, target_mean: np.ndarray | None = None
) -> np.ndarray:
    """Control cells moved by ``delta`` on the log1p scale, clamped at 0 (dense, one perturbation).

    With ``target_mean`` the per-gene shift is chosen so that the clamped cells' mean equals it
    (:func:`ccfm.model.mean_model.match_mean`), instead of adding ``delta`` and clamping.
    """
    dense = control_block.toarray() if sp.issparse(control_block) else np.asarray(control_block)
    if target_mean is not None:
        return match_mean(dense + delta[None, :], target_mean)
    return np.clip(dense + delta[None, :], 0.0, None).astype(np.float32)


@dataclass
class BaselineResult:
    """Predicted cells per condition plus what a reader needs to trust them."""

    predicted: dict[str, np.ndarray]
    fallback_nochange: list[str]
    method: str


def predict_baseline(
    method: str,
    conditions: Sequence[str],
    means: ConditionMeans,
    training: Sequence[str],
    controls: sp.csr_matrix,
    n_cells: int,
    seed: int,
    control_label: str = CONTROL_LABEL,
) -> BaselineResult:
    """Predict ``conditions`` with one baseline ``method`` from real ``controls`` (log1p, CSR)."""
    if method not in BASELINE_METHODS:
        raise ValueError(f"unknown baseline {method!r}; choose one of {BASELINE_METHODS}")
    rows = sample_control_rows(controls.shape[0], conditions, n_cells, seed)
    zero = np.zeros(len(means.genes))
    shared = mean_perturbation_delta(means, training, control_label) if method == "meanpert" else zero
    predicted: dict[str, np.ndarray] = {}
    fallback: list[str] = []
    for cond in conditions:
        delta = shared
        if method == "additive":
            summed = additive_delta(cond, means, control_label)
            if summed is None:
                log.warning(
                    "additive baseline: %s has a single without training cells; predicting no change for it", cond
                )
                fallback.append(cond)
                summed = zero
            delta = summed
        # no change keeps the sampled real cells; the others are centred on their defining mean
        target = None if method == "nochange" or cond in fallback else means.means[control_label] + delta
        predicted[cond] = shifted_cells(controls[rows[cond]], delta, target)
    return BaselineResult(predicted=predicted, fallback_nochange=fallback, method=method)


def training_conditions_needed(method: str, training: Sequence[str], conditions: Sequence[str]) -> list[str]:
    """Conditions whose means a method needs: controls plus the relevant training perturbations."""
    train_set = [t for t in training if t != CONTROL_LABEL]
    if method == "meanpert":
        return [CONTROL_LABEL, *train_set]
    if method == "additive":
        singles = {part for cond in conditions for part in cond.split(COMBO_SEPARATOR)}
        return [CONTROL_LABEL, *[t for t in train_set if t in singles]]
    return [CONTROL_LABEL]


def run_baseline(
    method: str,
    processed_h5ad: str | Path,
    split_json: str | Path,
    real_h5ad: str | Path,
    out_h5ad: str | Path,
    out_means_csv: str | Path,
    options: BaselineOptions = BaselineOptions(),
) -> BaselineResult:
    """Predict a fold's held-out perturbations (and ``options.extra_labels``) with one baseline and write them.

    The control cells that are shifted, and carried in the prediction file, are the real control
    cells of ``real_h5ad``; means come from ``processed_h5ad`` restricted to the split's train list.
    """
    cells_per_perturbation, seed = options.cells_per_perturbation, options.seed
    split = read_split(split_json)
    conditions = conditions_to_predict(split["test"], options.extra_labels)
    training = [t for t in split["train"] if t != CONTROL_LABEL]
    controls = read_control_cells(real_h5ad)  # the modelled genes of real.h5ad's control cells
    genes, controls = controls.genes, controls.matrix
    means = condition_means(
        processed_h5ad, training_conditions_needed(method, training, conditions), chunk_size=options.chunk_size
    )
    if means.genes != genes:
        raise ValueError(
            f"{processed_h5ad} and {real_h5ad} have different genes; rerun split so real.h5ad matches processed.h5ad"
        )
    result = predict_baseline(method, conditions, means, training, controls, cells_per_perturbation, seed)
    adata = build_prediction_anndata(genes, result.predicted, controls)
    # the control cell each predicted cell was shifted from (genes written back take its values)
    rows = sample_control_rows(controls.shape[0], conditions, cells_per_perturbation, seed)
    adata.obs["control_index"] = np.concatenate(
        [*(rows[cond] for cond in result.predicted), np.arange(controls.shape[0])]
    ).astype(np.int64)
    adata.uns["ccfm_baseline"] = {
        "method": method,
        "seed": int(seed),
        "cells_per_perturbation": int(cells_per_perturbation),
        "fallback_nochange": result.fallback_nochange,
        "n_training_perturbations": len(training),
    }
    write_h5ad_atomic(adata, out_h5ad)
    write_table_atomic(prediction_means(genes, result.predicted), out_means_csv)
    log.info(
        "%s: %d perturbations predicted (%d fell back to no change)",
        method,
        len(conditions),
        len(result.fallback_nochange),
    )
    return result
