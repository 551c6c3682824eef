"""Target prediction: the ``predict_target`` rule, from shifted and unshifted target controls."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from ccfm import CONTROL_LABEL, PERT_COLUMN
from ccfm.adapt.files import align_shift, check_same_genes, load_shift
from ccfm.adapt.requests import target_requests
from ccfm.adapt.shift import apply_shift
from ccfm.data.conditions import parse_condition
from ccfm.data.perturbations import PerturbationVocab
from ccfm.io.h5ad import CHUNK_SIZE, read_control_cells, read_obs
from ccfm.io.predictions import write_predictions
from ccfm.model.checkpoint import LoadedModel
from ccfm.model.expression import ExpressionData
from ccfm.model.generation import ControlCells, GenerateSettings, GenerationSetup, controls_mean, generate_labels

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Rule entry point 2: predict target perturbations from shifted (and unshifted) controls
# --------------------------------------------------------------------------------------------


@dataclass
class ShiftedExpression(ExpressionData):
    """Control cells whose dense batches come out shifted, ``max(X + s, 0)``.

    Handed to :func:`ccfm.model.generation.predict_label` in place of the source data, so the model
    engineer's sampler runs unchanged on the adapted target controls.
    """

    shift: np.ndarray | None = None

    def dense_rows(self, rows: np.ndarray) -> np.ndarray:
        dense = super().dense_rows(rows)
        return dense if self.shift is None else apply_shift(dense, self.shift)


def target_labels_to_predict(
    observed: Sequence[str], requested: Sequence[str], vocab: PerturbationVocab, control_label: str = CONTROL_LABEL
) -> list[str]:
    """The target perturbations to predict: the requested ones, then every observed one.

    ``requested`` (the dataset's ``target.predict``, e.g. the challenge's perturbations) come
    first and every entry must be embeddable by the model (a clear error otherwise). Every observed
    target perturbation is predicted too (after them, sorted): those are what the target scores
    are computed on; observed ones naming a gene the model cannot embed are skipped with a warning.
    """
    labels = list(dict.fromkeys(parse_condition(str(r), control_label=control_label).canonical for r in requested))
    if CONTROL_LABEL in labels:
        raise ValueError("target.predict lists the control label; list perturbations only")
    for label in labels:
        vocab.ids(label)
    skipped = []
    for label in sorted(set(map(str, observed)) - {control_label, CONTROL_LABEL} - set(labels)):
        try:
            vocab.ids(label)
        except KeyError:
            skipped.append(label)
            continue
        labels.append(label)
    if skipped:
        log.warning(
            "%d observed target perturbation(s) name genes the model cannot embed and are not predicted: %s",
            len(skipped),
            skipped[:20],
        )
    if not labels:
        raise ValueError(
            "no target perturbation to predict: the target data has none the model can embed and the "
            "dataset's target.predict list is empty"
        )
    return labels


def predict_target_cells(
    model: LoadedModel,
    controls: sp.csr_matrix,
    labels: Sequence[str],
    settings: GenerateSettings,
    *,
    seed: int,
    device: torch.device,
    shift: np.ndarray | None,
    n_cells: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Generate cells for every label from the (shifted) target controls with the cascaded sampler.

    Source cells and noise are seeded per label (:func:`ccfm.model.generation.label_seed`), so the
    adapted and unadapted predictions start from the same cells and the same noise: they differ
    only by the shift. ``n_cells`` (e.g. the challenge CSV's counts) overrides
    ``settings.cells_per_perturbation`` per label.
    """
    data = ShiftedExpression(controls, list(model.genes), np.full(controls.shape[0], CONTROL_LABEL), shift=shift)
    control_rows = np.arange(controls.shape[0])
    what = "adapted" if shift is not None else "unadapted"
    # An anchored model centres its cells on the context's own (unshifted) control mean + its
    # predicted shift: the MMD shift only changes what the flow sees, not the context the
    # prediction is for (centring on the shifted controls would move the prediction back into
    # the source context).
    raw = ShiftedExpression(controls, list(model.genes), np.full(controls.shape[0], CONTROL_LABEL), shift=None)
    reference = controls_mean(raw, control_rows)
    return generate_labels(
        GenerationSetup(model, device, settings), ControlCells(data, control_rows, reference), labels, seed,
        progress=f"predict target ({what})", n_cells=n_cells,
    )  # fmt: skip


def predict_target_to_files(
    generation: GenerationSetup,
    target_h5ad: str | Path,
    shift_path: str | Path,
    out_pred: str | Path,
    out_means: str | Path,
    out_pred_unadapted: str | Path,
    out_means_unadapted: str | Path,
    *,
    requested: str | Path | Sequence[str] = (),
    seed: int,
    control_label: str = CONTROL_LABEL,
    chunk_size: int = CHUNK_SIZE,
) -> list[str]:
    """Predict the target perturbations with and without the learned shift; write both files.

    ``requested`` is ``target.predict``: a list of labels or a challenge-style CSV path
    (:mod:`ccfm.adapt.requests`; its ``n_cells`` are the cells predicted per perturbation).
    Both prediction files carry the real (unshifted) target controls under ``non-targeting``:
    cell-eval's deltas must be relative to the real target context. Returns the labels.
    """
    model = generation.model
    controls = read_control_cells(target_h5ad, control_label=control_label, chunk_size=chunk_size)
    check_same_genes(model.genes, controls.genes, str(target_h5ad), generation.model_pt)
    shift, shift_genes, _ = load_shift(shift_path)
    shift_np = align_shift(shift, shift_genes, controls.genes).numpy()
    observed = read_obs(target_h5ad)[PERT_COLUMN].astype(str).unique()
    requests = target_requests(requested, control_label)
    labels = target_labels_to_predict(observed, requests.labels, model.vocab, control_label)
    log.info(
        "predicting %d target perturbation(s) from %d target controls (cells per perturbation: %s)",
        len(labels),
        controls.matrix.shape[0],
        f"from {requests.source}" if requests.n_cells else generation.settings.cells_per_perturbation,
    )
    for shift_or_none, pred_path, means_path in (
        (shift_np, out_pred, out_means),
        (None, out_pred_unadapted, out_means_unadapted),
    ):
        predicted = predict_target_cells(
            model,
            controls.matrix,
            labels,
            generation.settings,
            seed=seed,
            device=generation.device,
            shift=shift_or_none,
            n_cells=requests.n_cells,
        )
        write_predictions(pred_path, means_path, controls.genes, predicted, controls.matrix, CONTROL_LABEL)
    return labels
