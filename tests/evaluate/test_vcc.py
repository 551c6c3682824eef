"""The Virtual Cell Challenge score (ccfm.evaluate.vcc): cell-eval's scaling and its cell-mean baseline."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from ccfm.evaluate.vcc import SCORE_KEYS, VCC_METRICS, cell_mean_baseline, challenge_score


def _agg(des: float, pds: float, mae: float) -> pd.DataFrame:
    """cell-eval's aggregate layout (polars describe): a statistic column, one row per statistic."""
    rows = []
    for statistic, factor in (("count", None), ("mean", 1.0), ("std", 0.0), ("min", 1.0), ("max", 1.0)):
        if factor is None:
            rows.append({"statistic": statistic, "overlap_at_N": 5.0, "discrimination_score_l1": 5.0, "mae": 5.0})
        else:
            rows.append({"statistic": statistic, "overlap_at_N": des, "discrimination_score_l1": pds, "mae": mae})
    return pd.DataFrame(rows)


def test_scaling_is_cell_evals_by_hand() -> None:
    score = challenge_score(_agg(des=0.6, pds=0.9, mae=0.1), _agg(des=0.2, pds=0.5, mae=0.2))
    assert set(score) == set(SCORE_KEYS)
    assert score["des_scaled"] == pytest.approx((0.6 - 0.2) / (1 - 0.2))
    assert score["pds_scaled"] == pytest.approx((0.9 - 0.5) / (1 - 0.5))
    assert score["mae_scaled"] == pytest.approx(1 - 0.1 / 0.2)
    assert score["score"] == pytest.approx(np.mean([0.5, 0.8, 0.5]))
    assert (score["des"], score["pds"], score["mae"]) == (0.6, 0.9, 0.1)
    assert (score["des_baseline"], score["pds_baseline"], score["mae_baseline"]) == (0.2, 0.5, 0.2)


def test_worse_than_baseline_is_clipped_at_zero_and_baseline_scores_zero() -> None:
    base = _agg(des=0.3, pds=0.6, mae=0.2)
    worse = challenge_score(_agg(des=0.1, pds=0.4, mae=0.5), base)
    assert (worse["des_scaled"], worse["pds_scaled"], worse["mae_scaled"], worse["score"]) == (0.0, 0.0, 0.0, 0.0)
    itself = challenge_score(base, base)
    assert itself["score"] == 0.0


def test_per_perturbation_tables_are_averaged_like_cell_eval() -> None:
    method = pd.DataFrame(
        {
            "perturbation": ["A", "B"],
            "overlap_at_N": [0.4, 0.8],
            "discrimination_score_l1": [1.0, 0.8],
            "mae": [0.1, 0.3],
        }
    )
    base = pd.DataFrame(
        {
            "perturbation": ["A", "B"],
            "overlap_at_N": [0.2, 0.2],
            "discrimination_score_l1": [0.5, 0.5],
            "mae": [0.4, 0.4],
        }
    )
    score = challenge_score(method, base)
    assert score["des"] == pytest.approx(0.6)
    assert score["mae_scaled"] == pytest.approx(1 - 0.2 / 0.4)
    assert score["pds_scaled"] == pytest.approx((0.9 - 0.5) / 0.5)


def test_missing_metric_names_the_profile() -> None:
    with pytest.raises(ValueError, match="profile"):
        challenge_score(_agg(0.1, 0.2, 0.3).drop(columns=["mae"]), _agg(0.1, 0.2, 0.3))


def _real() -> ad.AnnData:
    rng = np.random.default_rng(0)
    labels = ["non-targeting"] * 6 + ["A"] * 2 + ["B"] * 4 + ["C"] * 3
    x = rng.gamma(2.0, 0.5, size=(len(labels), 5)).astype(np.float32)
    obs = pd.DataFrame({"target_gene": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))])
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(5)]))


def test_cell_mean_baseline_is_the_mean_of_perturbation_means_with_requested_counts() -> None:
    real = _real()
    counts = {"A": 3, "B": 1, "C": 2}
    base = cell_mean_baseline(real, counts)
    x = real.X.toarray()
    labels = real.obs["target_gene"].astype(str).to_numpy()
    # cell-eval 0.8.2 averages every group mean, the controls' included (not the mean of cells)
    expected = np.mean([x[labels == p].mean(axis=0) for p in ("A", "B", "C", "non-targeting")], axis=0)
    assert not np.allclose(expected, x.mean(axis=0))
    got = base.obs["target_gene"].astype(str).value_counts().to_dict()
    assert got == {"A": 3, "B": 1, "C": 2, "non-targeting": 6}
    perturbed = base.X[base.obs["target_gene"].astype(str).to_numpy() != "non-targeting"]
    np.testing.assert_allclose(perturbed, np.tile(expected, (6, 1)), rtol=1e-6)
    np.testing.assert_array_equal(base.X[-6:], x[:6])


def test_cell_mean_baseline_equals_cell_evals_own() -> None:
    from cell_eval import build_base_mean_adata

    real = _real()
    counts = {"A": 2, "B": 4, "C": 3}  # cell-eval takes the counts from the data when none are given
    theirs = build_base_mean_adata(real.copy())
    ours = cell_mean_baseline(real, counts)
    for pert in ("A", "B", "C", "non-targeting"):
        a = np.asarray(ours[ours.obs["target_gene"].astype(str) == pert].X)
        b = theirs[theirs.obs["target_gene"].astype(str) == pert].X
        b = b.toarray() if sp.issparse(b) else np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_metric_names_are_the_challenge_profile() -> None:
    from cell_eval._pipeline._runner import VCC_METRICS as cell_eval_vcc

    assert sorted(VCC_METRICS.values()) == sorted(cell_eval_vcc)
