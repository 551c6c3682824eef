"""The Virtual Cell Challenge score: DES, PDS and MAE, each scaled against a baseline, as ``cell-eval score`` does.

The challenge ranks a prediction by three cell-eval metrics of its held-out perturbations:

* **DES**, differential-expression score: ``overlap_at_N`` (overlap of the predicted and real
  DE gene sets, N = the number of real DE genes);
* **PDS**, perturbation discrimination score: ``discrimination_score_l1`` (how well each
  predicted perturbation effect picks out its own real effect among all of them);
* **MAE**: ``mae`` of the pseudobulk profiles.

Each is scaled against the same metric of a baseline prediction, the *cell-mean* baseline
(every perturbed cell predicted as the mean over the data's groups of their mean expression,
:func:`cell_mean_baseline`, the prediction ``cell-eval baseline`` builds). The scaling is
cell-eval's own (:func:`cell_eval.score_agg_metrics`, called here on the three columns): a
metric whose best value is 0 (MAE) scores ``1 - method / baseline``, one whose best value is 1
(DES, PDS) scores ``(method - baseline) / (1 - baseline)``; NaN becomes 0, negatives are
clipped to 0, and the overall score is the mean of the three. The baseline scores 0 against
itself; a perfect prediction scores 1.

Inputs are cell-eval's own outputs: its aggregate table (``statistic`` column, the ``mean`` row
is compared) or its per-perturbation table (``perturbation`` column, averaged here the way
``get_agg_results`` does). Used for the target-context scores (``ccfm.adapt.score``) and usable
for any fold's ``celleval_agg.csv``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ccfm import CONTROL_LABEL, PERT_COLUMN

# Challenge name -> cell-eval metric (cell-eval's ``vcc`` profile computes exactly these three).
VCC_METRICS: dict[str, str] = {"des": "overlap_at_N", "pds": "discrimination_score_l1", "mae": "mae"}
SCORE_KEYS: tuple[str, ...] = (
    *VCC_METRICS,
    *(f"{name}_baseline" for name in VCC_METRICS),
    *(f"{name}_scaled" for name in VCC_METRICS),
    "score",
)


def _as_agg(table: Any) -> pd.DataFrame:
    """cell-eval's aggregate table (pandas) from an aggregate or per-perturbation table (pandas or polars)."""
    frame = table.to_pandas() if hasattr(table, "to_pandas") and not isinstance(table, pd.DataFrame) else table
    frame = pd.DataFrame(frame)
    if "statistic" in frame.columns:
        return frame
    if "perturbation" not in frame.columns:
        raise ValueError(
            "expected cell-eval's aggregate table (a 'statistic' column) or its per-perturbation table "
            f"(a 'perturbation' column); got columns {list(frame.columns)[:10]}"
        )
    means = frame.drop(columns=["perturbation"]).apply(pd.to_numeric, errors="coerce").mean()
    return pd.DataFrame([{"statistic": "mean", **means.to_dict()}])


def challenge_score(method_agg: Any, baseline_agg: Any) -> dict[str, float]:
    """DES, PDS and MAE of a method, of the baseline, their scaled scores and the overall score.

    ``method_agg`` and ``baseline_agg`` are cell-eval tables (aggregate or per-perturbation; see
    the module docstring) of the same perturbations, each holding at least the columns of
    :data:`VCC_METRICS`. Returns the keys of :data:`SCORE_KEYS`: ``des``, ``pds``, ``mae`` (the
    method's means), ``*_baseline`` (the baseline's), ``*_scaled`` (cell-eval's normalisation,
    clipped at 0) and ``score`` (their mean, cell-eval's ``avg_score``).
    """
    import polars as pl
    from cell_eval import score_agg_metrics

    columns = ["statistic", *VCC_METRICS.values()]
    tables = {}
    for what, table in (("method", method_agg), ("baseline", baseline_agg)):
        agg = _as_agg(table)
        missing = [c for c in columns if c not in agg.columns]
        if missing:
            raise ValueError(
                f"the {what}'s cell-eval table has no {missing}: score it with a cell-eval profile that includes "
                "them (score.profile full or vcc)"
            )
        agg = agg[columns].copy()
        agg["statistic"] = agg["statistic"].astype(str)
        for column in columns[1:]:
            agg[column] = pd.to_numeric(agg[column], errors="coerce").astype(float)
        tables[what] = pl.from_pandas(agg)
    scaled = score_agg_metrics(tables["method"], tables["baseline"]).to_pandas().set_index("metric")["from_baseline"]
    mean_of = {what: table.to_pandas().set_index("statistic") for what, table in tables.items()}
    result: dict[str, float] = {}
    for name, metric in VCC_METRICS.items():
        result[name] = float(mean_of["method"].loc["mean", metric])
    for name, metric in VCC_METRICS.items():
        result[f"{name}_baseline"] = float(mean_of["baseline"].loc["mean", metric])
    for name, metric in VCC_METRICS.items():
        result[f"{name}_scaled"] = float(scaled[metric])
    result["score"] = float(scaled["avg_score"])
    return result


def group_means(real: ad.AnnData, pert_col: str = PERT_COLUMN) -> tuple[list[str], np.ndarray]:
    """(groups, their mean expression (n_groups, G)) of ``real``: one group per label, controls included."""
    labels = real.obs[pert_col].astype(str).to_numpy()
    groups = sorted(set(labels))
    matrix = real.X if sp.issparse(real.X) else np.asarray(real.X)
    means = np.zeros((len(groups), real.n_vars), dtype=np.float64)
    for i, group in enumerate(groups):
        means[i] = np.asarray(matrix[np.flatnonzero(labels == group)].mean(axis=0), dtype=np.float64).ravel()
    return groups, means


def cell_mean_baseline(
    real: ad.AnnData,
    n_cells: Mapping[str, int],
    control_label: str = CONTROL_LABEL,
    pert_col: str = PERT_COLUMN,
) -> ad.AnnData:
    """The challenge's cell-mean baseline of ``real``: what ``cell-eval baseline`` builds.

    Every cell of perturbation ``p`` (``n_cells[p]`` of them, e.g. the challenge's
    ``pert_counts`` CSV) is one vector: the mean over the groups of ``real`` of their mean
    expression. As in cell-eval 0.8.2 (``_build_pert_baseline`` without ``as_delta``) the
    control group is one of the groups averaged; a test holds this equal to
    ``cell_eval.build_base_mean_adata``. ``real``'s control cells follow unchanged. Same genes
    and ``obs`` column as ``real``; ``X`` is dense float32, one row per predicted cell.
    """
    groups, means = group_means(real, pert_col)
    if not set(groups) - {control_label}:
        raise ValueError("no perturbed cells: the cell-mean baseline needs at least one perturbation")
    baseline = means.mean(axis=0).astype(np.float32)
    labels = [str(p) for p in n_cells if str(p) != control_label]
    counts = [int(n_cells[p]) for p in labels]
    if any(c < 1 for c in counts):
        raise ValueError(f"cell counts must be positive: {dict(zip(labels, counts))}")
    controls = real[real.obs[pert_col].astype(str).to_numpy() == control_label]
    control_matrix = controls.X.toarray() if sp.issparse(controls.X) else np.asarray(controls.X)
    matrix = np.vstack([np.tile(baseline, (sum(counts), 1)), control_matrix.astype(np.float32)])
    obs_labels: Sequence[str] = [p for p, c in zip(labels, counts) for _ in range(c)] + [control_label] * controls.n_obs
    obs = pd.DataFrame(
        {pert_col: pd.Categorical(obs_labels, categories=[*labels, control_label])},
        index=pd.Index([f"cellmean_{i}" for i in range(len(obs_labels))], dtype=str),
    )
    return ad.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=real.var_names.copy()))
