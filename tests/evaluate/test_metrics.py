"""Compact metrics against hand computations on toy data."""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from ccfm.evaluate.metrics import (
    compact_metrics,
    mean_var,
    pearson_delta,
    squared_mean_shift,
    top_de_indices,
    welch_t,
)
from ccfm.io.predictions import PredictionError

GENES = ["g0", "g1", "g2", "g3"]
# Controls: mean 1 and variance 0.5 (ddof=1) on every gene.
CONTROLS = np.array([[0.5, 0.5, 0.5, 0.5], [1.5, 1.5, 1.5, 1.5]])


def _adata(blocks: dict[str, np.ndarray], sparse: bool = True) -> ad.AnnData:
    labels = [name for name, rows in blocks.items() for _ in range(len(rows))]
    matrix = np.vstack(list(blocks.values())).astype(np.float32)
    obs = pd.DataFrame({"target_gene": labels}, index=[f"c{i}" for i in range(len(labels))])
    return ad.AnnData(X=sp.csr_matrix(matrix) if sparse else matrix, obs=obs, var=pd.DataFrame(index=GENES))


def _toy_pair():
    # Real A: mean [2, 1, 0, 1] with no spread -> delta [1, 0, -1, 0]; |t| = 2 on g0 and g2, 0 elsewhere.
    real = _adata({"non-targeting": CONTROLS, "A": np.array([[2, 1, 0, 1], [2, 1, 0, 1]])})
    # Predicted A: mean [1.5, 1, 1, 1.5] -> delta [0.5, 0, 0, 0.5].
    pred = _adata(
        {"A": np.array([[1.0, 1, 1, 1], [2.0, 1, 1, 2]]), "non-targeting": CONTROLS, "Z": np.ones((2, 4))},
        sparse=False,
    )
    return pred, real


def test_pearson_delta_equals_hand_computation():
    # x = [1, 0, -1, 0] (mean 0); y = [.5, 0, 0, .5] (mean .25) -> yc = [.25, -.25, -.25, .25]
    # sum(x*yc) = .5, sum(x^2) = 2, sum(yc^2) = .25 -> r = .5 / sqrt(.5) = 1/sqrt(2).
    value = pearson_delta(np.array([1.5, 1, 1, 1.5]), np.array([2.0, 1, 0, 1]), np.ones(4))
    assert value == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    # A constant predicted delta has no defined correlation.
    assert math.isnan(pearson_delta(np.ones(4), np.array([2.0, 1, 0, 1]), np.ones(4)))


def test_welch_t_and_top_de_ranking():
    control = mean_var(sp.csr_matrix(CONTROLS))
    np.testing.assert_allclose(control.mean, 1.0)
    np.testing.assert_allclose(control.var, 0.5)
    group = mean_var(np.array([[2, 1, 0, 1], [2, 1, 0, 1.0]]))
    # t = diff / sqrt(0/2 + 0.5/2) = diff / 0.5
    np.testing.assert_allclose(welch_t(group, control), [2.0, 0.0, -2.0, 0.0])
    assert sorted(top_de_indices(group, control, 2).tolist()) == [0, 2]


def test_squared_mean_shift_hand_value():
    x = np.array([[0.0], [2.0]])
    y = np.array([[1.0], [3.0]])
    # between: (1 + 9 + 1 + 1)/4 = 3; within (diagonal included): (0 + 4 + 4 + 0)/4 = 2 each;
    # 2*3 - 2 - 2 = 2 = 2 * (mean shift 1)^2: the squared-distance E-distance sees means only.
    assert squared_mean_shift(x, y) == pytest.approx(2 * 3 - 2 - 2)
    assert squared_mean_shift(x, x) == pytest.approx(0.0)
    # a point mass at the mean scores the same as the real spread: the reason for the rename
    assert squared_mean_shift(np.array([[1.0], [1.0]]), np.array([[0.0], [2.0]])) == pytest.approx(0.0)


def test_compact_metrics_toy_table():
    pred, real = _toy_pair()
    table = compact_metrics(pred, real, "non-targeting", top_de=2, seed=0)
    assert list(table["perturbation"]) == ["A"]  # the unscorable extra 'Z' is ignored
    row = table.iloc[0]
    assert row["pearson_delta_pseudobulk"] == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    # Top-2 DE genes g0, g2: x = [1, -1], y = [.5, 0] -> r = 1.
    assert row["pearson_delta_top_de"] == pytest.approx(1.0, abs=1e-6)
    # squared errors of the means: [.25, 0, 1, .25]
    assert row["mse"] == pytest.approx(0.375, abs=1e-6)
    assert row["mse_top_de"] == pytest.approx(0.625, abs=1e-6)
    assert row["n_cells_pred"] == 2 and row["n_cells_real"] == 2 and row["top_de"] == 2
    # E-distance = 2·|mean difference|² in the real cells' PCA space (3 components of 4 cells). The
    # mean difference [-.5, 0, 1, .5] has |.|² = 1.5; its part in the 2-d span of the real cells is
    # [-.5, .25, 1, .25] (|.|² = 1.375); the rest, [0, -.25, 0, .25], lies in the complement where the
    # third, zero-variance component points in a direction the data leave open: 2.75 <= E <= 3.0.
    assert 2.75 - 1e-6 <= row["sq_mean_shift"] <= 3.0 + 1e-6


def test_mean_shift_is_zero_for_identical_cells_and_grows_with_shift():
    rng = np.random.default_rng(0)
    ctrl = rng.uniform(0, 2, size=(30, 4))
    real_a = rng.uniform(0, 2, size=(20, 4)) + [1, 0, 0, 0]
    real = _adata({"non-targeting": ctrl, "A": real_a})
    exact = compact_metrics(_adata({"A": real_a, "non-targeting": ctrl}), real, top_de=2)
    off = compact_metrics(_adata({"A": real_a + [0, 1, 0, 0], "non-targeting": ctrl}), real, top_de=2)
    assert exact.loc[0, "sq_mean_shift"] == pytest.approx(0.0, abs=1e-8)
    assert exact.loc[0, "pearson_delta_pseudobulk"] == pytest.approx(1.0)
    # every PC is kept (4 genes, 50 cells), so the projection is a rotation: 2 * |(0, 1, 0, 0)|^2
    assert off.loc[0, "sq_mean_shift"] == pytest.approx(2.0, rel=1e-6)
    # the cell metrics see the same sets: identical cells score their own split-half floor
    assert exact.loc[0, "std_ratio"] == pytest.approx(1.0)


def test_missing_perturbation_is_an_error():
    pred, real = _toy_pair()
    real_more = _adata({"non-targeting": CONTROLS, "A": np.ones((2, 4)), "B": np.ones((2, 4))})
    with pytest.raises(PredictionError, match=r"not predicted: \['B'\]"):
        compact_metrics(pred, real_more, "non-targeting")


def test_summary_means_per_fold_and_over_folds(tmp_path):
    from ccfm.evaluate.metrics import summarize_score_files

    def compact(values):
        return pd.DataFrame(
            {
                "perturbation": ["A+B", "C+D"],
                **{
                    m: values
                    for m in ["pearson_delta_pseudobulk", "pearson_delta_top_de", "mse", "mse_top_de", "sq_mean_shift"]
                },
            }
        )

    def agg(mean):
        return pd.DataFrame({"statistic": ["count", "mean"], "mae": [2.0, mean]})

    paths = []
    for method, fold, values, mae in [
        ("additive", 1, [0.2, 0.4], 0.1),
        ("additive", 2, [0.6, 0.8], 0.3),
        ("nochange", 1, [0.0, 0.0], 0.5),
    ]:
        c, a = tmp_path / f"{method}{fold}.tsv", tmp_path / f"{method}{fold}.csv"
        compact(values).to_csv(c, sep="\t", index=False)
        agg(mae).to_csv(a, index=False)
        paths.append((method, fold, str(c), str(a)))
    methods, folds, compacts, aggs = map(list, zip(*paths))
    table = summarize_score_files(methods, folds, compacts, aggs, "demo", str(tmp_path / "summary.tsv"))
    written = pd.read_csv(tmp_path / "summary.tsv", sep="\t", dtype={"fold": str})
    assert list(written["fold"]) == ["1", "2", "1", "all", "all"]
    row = written.set_index(["method", "fold"])
    assert row.loc[("additive", "1"), "pearson_delta_pseudobulk"] == pytest.approx(0.3)
    assert row.loc[("additive", "all"), "pearson_delta_pseudobulk"] == pytest.approx(0.5)  # (0.3 + 0.7) / 2
    assert row.loc[("additive", "all"), "celleval_mae"] == pytest.approx(0.2)
    assert row.loc[("nochange", "all"), "n_perturbations"] == 2
    assert table.shape == written.shape
