"""Target scoring (rules ``score_target``/``score_target_state``): adapted vs unadapted predictions beside
target-control baselines."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ccfm import COMBO_SEPARATOR, CONTROL_LABEL, PERT_COLUMN
from ccfm.adapt.requests import count_groups
from ccfm.data.validation import check_enough_perturbations
from ccfm.evaluate.baselines import condition_means, predict_baseline
from ccfm.evaluate.celleval import run_cell_eval
from ccfm.evaluate.metrics import TOP_DE, compact_metrics
from ccfm.evaluate.vcc import cell_mean_baseline, challenge_score
from ccfm.io.atomic import write_table_atomic
from ccfm.io.h5ad import CHUNK_SIZE, read_obs, read_rows_with_labels
from ccfm.io.predictions import build_prediction_anndata, read_expression_h5ad

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Rule entry point 3: score target predictions beside target-control baselines
# --------------------------------------------------------------------------------------------

# CCFM's rows; another model's are named after it (target_methods).
TARGET_METHODS = ("ccfm_adapted", "ccfm_unadapted", "nochange", "additive", "cellmean")
# The challenge's scaled scores are relative to this method's cell-eval metrics.
CHALLENGE_BASELINE = "cellmean"
# Profiles whose aggregate already holds the challenge's three metrics.
PROFILES_WITH_VCC_METRICS = ("full", "vcc")


def target_baselines(
    processed_h5ad: str | Path,
    controls: sp.csr_matrix,
    genes: Sequence[str],
    labels: Sequence[str],
    *,
    n_cells: int | Mapping[str, int],
    seed: int,
    chunk_size: int = CHUNK_SIZE,
) -> dict[str, dict[str, np.ndarray]]:
    """``nochange`` and ``additive`` predictions built from the *target* controls.

    ``additive`` moves the target controls by the sum of the source single-perturbation deltas
    (means from ``processed.h5ad``): the context-transfer baseline that needs no model at all.
    ``n_cells``: one count for every label, or a count per label (the predictions' own).
    """
    singles = sorted({part for label in labels for part in label.split(COMBO_SEPARATOR)})
    source_labels = set(read_obs(processed_h5ad)[PERT_COLUMN].astype(str))
    available = [s for s in singles if s in source_labels]
    means = condition_means(processed_h5ad, [CONTROL_LABEL, *available], chunk_size=chunk_size)
    if means.genes != list(genes):
        raise ValueError(f"{processed_h5ad} genes differ from the target's; rerun preprocess_target")
    predicted: dict[str, dict[str, np.ndarray]] = {"nochange": {}, "additive": {}}
    for count, group in count_groups(list(labels), n_cells).items():
        for method in predicted:
            predicted[method].update(predict_baseline(method, group, means, available, controls, count, seed).predicted)
    return {method: {label: cells[label] for label in labels} for method, cells in predicted.items()}


def _real_target_anndata(target_h5ad: str | Path, labels: Sequence[str], chunk_size: int) -> ad.AnnData:
    """Target controls plus the cells of ``labels``, read in row chunks (other cells never loaded)."""
    rows = read_rows_with_labels(
        target_h5ad, lambda found: np.isin(found, [*labels, CONTROL_LABEL]), chunk_size=chunk_size
    )
    return ad.AnnData(
        X=rows.matrix,
        obs=pd.DataFrame({PERT_COLUMN: pd.Categorical(rows.labels)}, index=pd.Index(rows.cell_names, dtype=str)),
        var=pd.DataFrame(index=pd.Index(rows.genes, dtype=str)),
    )


def _restrict(pred: ad.AnnData, labels: Sequence[str]) -> ad.AnnData:
    keep = pred.obs[PERT_COLUMN].astype(str).isin([*labels, CONTROL_LABEL]).to_numpy()
    pred = pred[keep].copy()
    pred.obs[PERT_COLUMN] = pred.obs[PERT_COLUMN].astype(str).astype("category")
    return pred


@dataclass(frozen=True)
class TargetScoreFiles:
    """Inputs (target and source data, the adapted and unadapted predictions) and outputs of the target scores."""

    target_h5ad: str | Path
    processed_h5ad: str | Path
    pred_adapted: str | Path
    pred_unadapted: str | Path
    metrics_tsv: str | Path
    summary_tsv: str | Path


@dataclass(frozen=True)
class TargetScoreSettings:
    """How target predictions are scored.

    ``method`` names the model's rows (``{method}_adapted``, ``{method}_unadapted``);
    ``n_cells`` is the cells per perturbation of a baseline whose perturbation the adapted
    prediction lacks; ``cell_eval_profile`` None leaves cell-eval (and the challenge score) out.
    """

    n_cells: int
    seed: int
    method: str = "ccfm"
    top_de: int = TOP_DE
    cell_eval_profile: str | None = "full"
    num_threads: int = 1
    chunk_size: int = CHUNK_SIZE


def target_methods(method: str = "ccfm") -> tuple[str, ...]:
    """The rows of a target summary: the model from shifted and unshifted controls, then the baselines."""
    return (f"{method}_adapted", f"{method}_unadapted", *TARGET_METHODS[2:])


def score_target_to_files(files: TargetScoreFiles, settings: TargetScoreSettings) -> pd.DataFrame:
    """Score adapted and unadapted predictions beside the target-control baselines.

    Methods (:func:`target_methods`): the model from shifted controls, from unshifted controls,
    the ``nochange``/``additive`` baselines built from the target controls, and the challenge's
    ``cellmean`` baseline (:func:`ccfm.evaluate.vcc.cell_mean_baseline` of the scored target
    perturbations). Every baseline predicts as many cells per perturbation as the adapted
    prediction holds (e.g. a challenge CSV's ``n_cells``); ``settings.n_cells`` is the fallback
    for a perturbation it lacks. Scored on the target perturbations that were both predicted and
    observed, against the real target cells (controls + those perturbations, read in row
    chunks). Writes the compact metrics per perturbation (``method`` column) and a per-method
    summary: the compact means plus, with ``cell_eval_profile``, cell-eval's aggregate means
    (columns prefixed ``celleval_``) and the challenge score (``vcc_*`` columns:
    :func:`ccfm.evaluate.vcc.challenge_score` against ``cellmean``).
    """
    predicted = read_expression_h5ad(files.pred_adapted)
    real, scored = _scored_target(files.target_h5ad, predicted, settings)
    predictions = _target_predictions(files, settings, predicted, real, scored)
    metrics, summary = _score_predictions(predictions, real, scored, settings)
    write_table_atomic(metrics, files.metrics_tsv, sep="\t", index=False)
    write_table_atomic(summary, files.summary_tsv, sep="\t", index=False)
    log.info("target scores (mean over %d perturbations):\n%s", len(scored), summary.to_string(index=False))
    return summary


def _scored_target(
    target_h5ad: str | Path, predicted: ad.AnnData, settings: TargetScoreSettings
) -> tuple[ad.AnnData, list[str]]:
    """The real target cells of the predicted perturbations, and those of them that were observed (scored)."""
    labels = sorted(set(predicted.obs[PERT_COLUMN].astype(str)) - {CONTROL_LABEL})
    real = _real_target_anndata(target_h5ad, labels, settings.chunk_size)
    scored = sorted(set(real.obs[PERT_COLUMN].astype(str)) - {CONTROL_LABEL})
    if not scored:
        raise ValueError(f"{target_h5ad}: none of the predicted target perturbations was observed; nothing to score")
    unscored = sorted(set(labels) - set(scored))
    if unscored:
        log.info(
            "%d predicted target perturbation(s) have no observed cells and are not scored: %s",
            len(unscored),
            unscored[:10],
        )
    if settings.cell_eval_profile:
        # before any scoring: cell-eval would otherwise fail in its last metrics, after the others
        check_enough_perturbations(len(scored), settings.cell_eval_profile, str(target_h5ad), target=True)
    return real, scored


def _target_predictions(
    files: TargetScoreFiles,
    settings: TargetScoreSettings,
    predicted: ad.AnnData,
    real: ad.AnnData,
    scored: Sequence[str],
) -> dict[str, ad.AnnData]:
    """Every scored method's prediction, in :func:`target_methods` order."""
    genes = [str(g) for g in real.var_names]
    controls = real.X[np.flatnonzero(real.obs[PERT_COLUMN].astype(str).to_numpy() == CONTROL_LABEL)]
    counts = predicted.obs[PERT_COLUMN].astype(str).value_counts()
    per_label = {label: int(counts.get(label, settings.n_cells)) for label in scored}
    adapted, unadapted, *_ = target_methods(settings.method)
    predictions = {adapted: predicted, unadapted: read_expression_h5ad(files.pred_unadapted)}
    for method, cells in target_baselines(
        files.processed_h5ad,
        controls,
        genes,
        scored,
        n_cells=per_label,
        seed=settings.seed,
        chunk_size=settings.chunk_size,
    ).items():
        predictions[method] = build_prediction_anndata(genes, cells, controls)
    predictions["cellmean"] = cell_mean_baseline(real, per_label)
    return predictions


def _score_predictions(
    predictions: Mapping[str, ad.AnnData], real: ad.AnnData, scored: Sequence[str], settings: TargetScoreSettings
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(compact metrics per perturbation and method, one summary row per method)."""
    frames, summaries, challenge_aggs = [], [], {}
    profile = settings.cell_eval_profile
    for method, pred in predictions.items():
        pred = _restrict(pred, scored)
        frame = compact_metrics(pred, real, CONTROL_LABEL, settings.top_de, seed=settings.seed)
        frame.insert(0, "method", method)
        frames.append(frame)
        summary = frame.drop(columns=["method", "perturbation"]).mean().to_frame().T
        if profile:
            _, aggregate = run_cell_eval(pred, real, CONTROL_LABEL, profile, settings.num_threads)
            summary = pd.concat([summary, _celleval_means(aggregate)], axis=1)
            if profile not in PROFILES_WITH_VCC_METRICS:
                _, aggregate = run_cell_eval(pred, real, CONTROL_LABEL, "vcc", settings.num_threads)
            challenge_aggs[method] = aggregate
        summary.insert(0, "method", method)
        summaries.append(summary)
    metrics = pd.concat(frames, ignore_index=True)
    summary = pd.concat(summaries, ignore_index=True)
    summary.insert(1, "n_perturbations", len(scored))
    if challenge_aggs:
        summary = pd.concat([summary, challenge_table(challenge_aggs, list(predictions))], axis=1)
    return metrics, summary


def challenge_table(aggregates: Mapping[str, pd.DataFrame], methods: Sequence[str]) -> pd.DataFrame:
    """``vcc_*`` columns, one row per method: the challenge score against :data:`CHALLENGE_BASELINE`."""
    base = aggregates[CHALLENGE_BASELINE]
    rows = [{f"vcc_{k}": v for k, v in challenge_score(aggregates[m], base).items()} for m in methods]
    return pd.DataFrame(rows)


def _celleval_means(aggregate: pd.DataFrame) -> pd.DataFrame:
    """One row of cell-eval's per-metric means (its aggregate table has a ``statistic`` column)."""
    if "statistic" in aggregate.columns:
        row = aggregate.set_index("statistic").loc[["mean"]].reset_index(drop=True)
    else:
        row = aggregate.mean(numeric_only=True).to_frame().T
    return row.add_prefix("celleval_").reset_index(drop=True)
