"""Target prediction (rules ``predict_target``/``predict_target_state``) from shifted and unshifted target controls."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ccfm import CONTROL_LABEL, PERT_COLUMN
from ccfm.adapt.adaptable import AdaptableModel
from ccfm.adapt.files import align_shift, load_shift
from ccfm.adapt.requests import target_requests
from ccfm.io.h5ad import read_control_cells, read_obs
from ccfm.io.predictions import write_predictions

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Rule entry point 2: predict target perturbations from shifted (and unshifted) controls
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetPredictionFiles:
    """The predictions (h5ad) and their per-perturbation means (CSV), from shifted and from unshifted controls."""

    pred: str | Path
    means: str | Path
    pred_unadapted: str | Path
    means_unadapted: str | Path


def predict_target_to_files(
    model: AdaptableModel,
    target_h5ad: str | Path,
    shift_path: str | Path,
    outputs: TargetPredictionFiles,
    *,
    requested: str | Path | Sequence[str] = (),
    seed: int,
) -> list[str]:
    """Predict the target perturbations with and without the learned shift; write both files.

    ``requested`` is ``target.predict``: a list of labels or a challenge-style CSV path
    (:mod:`ccfm.adapt.requests`; its ``n_cells`` are the cells predicted per perturbation).
    Both prediction files carry the real (unshifted) target controls under ``non-targeting``:
    cell-eval's deltas must be relative to the real target context. Returns the labels.
    """
    controls = read_control_cells(target_h5ad)
    model.check_genes(controls.genes, str(target_h5ad))
    shift, shift_genes, _ = load_shift(shift_path)
    shift_np = align_shift(shift, shift_genes, controls.genes).numpy()
    observed = read_obs(target_h5ad)[PERT_COLUMN].astype(str).unique()
    requests = target_requests(requested)
    labels = model.target_labels(observed, requests.labels)
    log.info(
        "predicting %d target perturbation(s) with %s from %d target controls (cells per perturbation: %s)",
        len(labels),
        model.method,
        controls.matrix.shape[0],
        f"from {requests.source}" if requests.n_cells else model.cells_per_perturbation,
    )
    for shift_or_none, pred_path, means_path in (
        (shift_np, outputs.pred, outputs.means),
        (None, outputs.pred_unadapted, outputs.means_unadapted),
    ):
        predicted = model.predict_target(controls.matrix, labels, requests.n_cells, seed=seed, shift=shift_or_none)
        write_predictions(pred_path, means_path, controls.genes, predicted, controls.matrix, CONTROL_LABEL)
    return labels
