"""The MMD shift adapter on a State run directory (the original plan's setting, done right).

The same learner as for CCFM (:func:`ccfm.adapt.learn_shift`): one additive offset per gene on
the target's log1p expression, ``max(X_tgt + s, 0)``, fitted so that State's ``basal_encoder``
of the shifted target controls is MMD-close to its encoding of the source controls. The shift
acts on raw expression and the encoder is applied after it, once (the seed script encoded the
target controls and then encoded the encodings again). Target perturbations are then predicted
with the model's ``predict_step`` from the shifted and, for comparison, the unshifted target
controls, and written in the Virtual Cell Challenge layout: an h5ad with ``obs["target_gene"]``
holding the predicted cells and the real ``non-targeting`` controls, plus a per-perturbation mean
CSV. Scoring reuses :func:`ccfm.adapt.score_target_to_files` and names the rows ``state_*``.

The run directory is either the pipeline's own fold model or any State run directory a user
holds (config ``state.run_dir``), loaded with :func:`ccfm.state.model.load_state_run`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ccfm import CONTROL_LABEL, PERT_COLUMN
from ccfm.adapt.files import align_shift, learn_shift_to_files, load_shift
from ccfm.adapt.requests import counts_by_label, target_requests
from ccfm.adapt.score import score_target_to_files
from ccfm.adapt.shift import AdaptSettings
from ccfm.adapt.sources import read_source_controls
from ccfm.io.h5ad import read_control_cells, read_obs
from ccfm.io.predictions import write_predictions, write_table_atomic
from ccfm.state.model import StateRun, check_genes, encode_basal, load_state_run
from ccfm.state.predict import predict_from_controls

log = logging.getLogger(__name__)

TARGET_METHOD_NAMES = {"ccfm_adapted": "state_adapted", "ccfm_unadapted": "state_unadapted"}


def adapt_state_to_files(
    run_dir: str | Path,
    processed_h5ad: str | Path,
    target_h5ad: str | Path,
    out_shift: str | Path,
    out_mmd_tsv: str | Path,
    out_history_tsv: str | Path,
    settings: AdaptSettings,
    *,
    seed: int,
    device: str = "cpu",
    source_files: Sequence[str | Path] = (),
    source_options: Mapping[str, Any] | None = None,
):
    """Learn the per-gene shift of the target controls against State's basal encoder and write its files.

    Source controls: ``processed.h5ad``'s plus those of ``source_files`` (``adapt.source_files``).
    """
    run = load_state_run(run_dir, device=device)
    source = read_source_controls(processed_h5ad, source_files, **dict(source_options or {}))
    target = read_control_cells(target_h5ad)
    check_genes(run, source.genes, str(processed_h5ad))
    check_genes(run, target.genes, str(target_h5ad))
    log.info(
        "adapting %d target controls to %d source controls through State's basal encoder (%d genes)",
        target.matrix.shape[0],
        source.matrix.shape[0],
        len(target.genes),
    )
    return learn_shift_to_files(
        lambda expression: encode_basal(run, expression),
        source,
        target,
        out_shift,
        out_mmd_tsv,
        out_history_tsv,
        settings,
        seed=seed,
        device=device,
        provenance={
            "encoder": "state basal_encoder",
            "model": str(run.directory),
            "checkpoint": str(run.checkpoint),
            "target": str(target_h5ad),
            "source": str(processed_h5ad),
            "source_files": [str(f) for f in source_files],
        },
    )


def state_target_labels(run: StateRun, observed: Sequence[str], requested: Sequence[str]) -> list[str]:
    """Target perturbations to predict: ``requested`` first (each must be known to State, alone or as
    a combination of known singles), then every observed one State can represent (what is scored)."""

    def representable(label: str) -> bool:
        return label in run.pert_map or all(part in run.pert_map for part in label.split("+"))

    labels = list(dict.fromkeys(str(r) for r in requested))
    unknown = [label for label in labels if label == CONTROL_LABEL or not representable(label)]
    if unknown:
        raise ValueError(f"target.predict lists {unknown}, which the State model in {run.directory} has no one-hot for")
    candidates = sorted(set(map(str, observed)) - {CONTROL_LABEL} - set(labels))
    extra = [label for label in candidates if representable(label)]
    skipped = sorted(set(candidates) - set(extra))
    if skipped:
        log.warning(
            "%d target perturbation(s) unknown to the State model are not predicted: %s", len(skipped), skipped[:20]
        )
    labels += extra
    if not labels:
        raise ValueError(f"no target perturbation is known to the State model in {run.directory}; nothing to predict")
    return labels


def predict_target_state_to_files(
    run_dir: str | Path,
    target_h5ad: str | Path,
    shift_path: str | Path,
    out_pred: str | Path,
    out_means: str | Path,
    out_pred_unadapted: str | Path,
    out_means_unadapted: str | Path,
    *,
    requested: str | Path | Sequence[str] = (),
    cells_per_perturbation: int = 128,
    seed: int = 0,
) -> list[str]:
    """Target predictions from shifted and from unshifted target controls (VCC layout, both).

    ``requested`` is ``target.predict`` (a list, or a challenge CSV whose ``n_cells`` are honoured).
    """
    run = load_state_run(run_dir)
    controls = read_control_cells(target_h5ad)
    check_genes(run, controls.genes, str(target_h5ad))
    shift, shift_genes, _ = load_shift(shift_path)
    shift_np = align_shift(shift, shift_genes, controls.genes).numpy()
    requests = target_requests(requested)
    labels = state_target_labels(run, read_obs(target_h5ad)[PERT_COLUMN].astype(str).unique(), requests.labels)
    n_cells = counts_by_label(labels, requests.n_cells, cells_per_perturbation)
    log.info(
        "predicting %d target perturbation(s) with State from %d target controls", len(labels), controls.matrix.shape[0]
    )
    for shift_or_none, pred_path, means_path in (
        (shift_np, out_pred, out_means),
        (None, out_pred_unadapted, out_means_unadapted),
    ):
        predicted = predict_from_controls(run, controls.matrix, labels, n_cells, seed, shift=shift_or_none)
        write_predictions(pred_path, means_path, controls.genes, predicted, controls.matrix, CONTROL_LABEL)
    return labels


def score_target_state_to_files(
    target_h5ad: str | Path,
    processed_h5ad: str | Path,
    pred_adapted: str | Path,
    pred_unadapted: str | Path,
    out_metrics_tsv: str | Path,
    out_summary_tsv: str | Path,
    **kwargs,
) -> pd.DataFrame:
    """:func:`ccfm.adapt.score_target_to_files` on State's predictions; rows named ``state_*``."""
    score_target_to_files(
        target_h5ad, processed_h5ad, pred_adapted, pred_unadapted, out_metrics_tsv, out_summary_tsv, **kwargs
    )
    tables = {}
    for path in (out_metrics_tsv, out_summary_tsv):
        frame = pd.read_csv(path, sep="\t")
        frame["method"] = frame["method"].replace(TARGET_METHOD_NAMES)
        write_table_atomic(frame, path, sep="\t", index=False)
        tables[path] = frame
    return tables[out_summary_tsv]
