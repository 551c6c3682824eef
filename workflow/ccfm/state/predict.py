"""Fold predictions of a trained State model, in the pipeline's prediction format.

Same perturbations as every other method (the fold's held-out list plus the dataset's
``predict:`` entries), started from the same control cells: :func:`ccfm.baselines.sample_control_rows`
with the baselines' seed (``seed + fold``) draws the control rows of ``real.h5ad`` per
perturbation, and State maps each draw through ``predict_step``. Written with
:func:`ccfm.predictions.write_predictions` (``pred.h5ad`` + ``pred_means.csv``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from ccfm.adapt.requests import control_rows_per_label
from ccfm.data.conditions import conditions_to_predict
from ccfm.io.h5ad import read_control_cells
from ccfm.io.predictions import write_predictions
from ccfm.io.splits import read_split
from ccfm.state.model import StateRun, check_genes, load_state_run, perturbation_vector, predict_cells

log = logging.getLogger(__name__)


def predict_from_controls(
    run: StateRun, controls, labels: Sequence[str], n_cells: int | Mapping[str, int], seed: int, shift=None
) -> dict:
    """``{label: (n_cells, G)}`` from per-label draws of ``controls`` (CSR), optionally shifted first.

    ``n_cells`` is one count for every label or a count per label.
    """
    from ccfm.adapt.shift import apply_shift

    rows = control_rows_per_label(controls.shape[0], list(labels), n_cells, seed)
    predicted = {}
    for label in labels:
        block = controls[rows[label]].toarray()
        if shift is not None:
            block = apply_shift(block, shift)
        _, unknown = perturbation_vector(run, label)
        if unknown:
            log.warning("%s: State has no one-hot for %s; predicted from the other part(s) only", label, unknown)
        predicted[label] = predict_cells(run, block, label)
    return predicted


def predict_state_to_files(
    run_dir: str | Path,
    split_json: str | Path,
    real_h5ad: str | Path,
    out_h5ad: str | Path,
    out_means_csv: str | Path,
    *,
    extra_labels: Sequence[str] = (),
    cells_per_perturbation: int = 128,
    seed: int = 0,
) -> list[str]:
    """Predict the fold's held-out (and ``extra_labels``) perturbations with State and write them."""
    split = read_split(split_json)
    conditions = conditions_to_predict(split["test"], extra_labels)
    control_rows = read_control_cells(real_h5ad)
    genes, controls = control_rows.genes, control_rows.matrix
    run = load_state_run(run_dir)
    check_genes(run, genes, str(real_h5ad))
    predicted = predict_from_controls(run, controls, conditions, cells_per_perturbation, seed)
    write_predictions(out_h5ad, out_means_csv, genes, predicted, controls)
    return conditions
