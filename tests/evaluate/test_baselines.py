"""Baselines on a toy dataset whose answers are known analytically."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from ccfm.evaluate.baselines import BaselineOptions, condition_means, run_baseline, sample_control_rows
from ccfm.io.predictions import read_expression_h5ad, read_prediction_means
from ccfm.model.mean_model import match_mean

GENES = ["g0", "g1", "g2"]
# Control rows average to [1, 1, 1].
CONTROLS = np.array([[0.5, 1, 1], [1.5, 1, 1], [1, 0.5, 1.5], [1, 1.5, 0.5]])
# Two cells per training single; their means are A=[2,1,1], B=[1,0.5,3], C=[1,0,1].
SINGLES = {
    "A": np.array([[1.5, 1, 1], [2.5, 1, 1]]),
    "B": np.array([[1, 0.5, 2], [1, 0.5, 4]]),
    "C": np.array([[1, 0, 1], [1, 0, 1]]),
}
# Held-out doubles: values far from anything additive, so any leak into a mean would show.
HELD_OUT = {"A+B": np.full((3, 3), 9.0), "B+C": np.full((2, 3), 7.0)}


def _adata(blocks: dict[str, np.ndarray]) -> ad.AnnData:
    labels = [name for name, rows in blocks.items() for _ in range(len(rows))]
    matrix = np.vstack(list(blocks.values())).astype(np.float32)
    obs = pd.DataFrame({"target_gene": labels}, index=[f"cell{i}" for i in range(len(labels))])
    obs["condition_type"] = [
        "control" if lab == "non-targeting" else ("double" if "+" in lab else "single") for lab in labels
    ]
    return ad.AnnData(X=sp.csr_matrix(matrix), obs=obs, var=pd.DataFrame(index=GENES))


@pytest.fixture()
def toy_fold(tmp_path):
    # Interleave controls with perturbations so chunked reading crosses condition boundaries.
    processed = _adata({"non-targeting": CONTROLS[:2], **SINGLES, "x": CONTROLS[2:], **HELD_OUT})
    processed.obs["target_gene"] = processed.obs["target_gene"].replace("x", "non-targeting")
    processed.write_h5ad(tmp_path / "processed.h5ad")
    _adata({"non-targeting": CONTROLS, **HELD_OUT}).write_h5ad(tmp_path / "real.h5ad")
    split = {"fold": 1, "seed": 0, "train": ["A", "B", "C"], "test": ["A+B", "B+C"], "controls": "non-targeting"}
    (tmp_path / "split.json").write_text(json.dumps(split))
    return tmp_path


def _run(fold_dir, method, extra=(), n_cells=4):
    out = fold_dir / method
    result = run_baseline(
        method,
        fold_dir / "processed.h5ad",
        fold_dir / "split.json",
        fold_dir / "real.h5ad",
        out / "pred.h5ad",
        out / "pred_means.csv",
        BaselineOptions(extra_labels=extra, cells_per_perturbation=n_cells, seed=3, chunk_size=2),
    )
    return result, read_expression_h5ad(out / "pred.h5ad"), read_prediction_means(out / "pred_means.csv")


def _sorted_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix[np.lexsort(matrix.T[::-1])]


def test_streaming_means_match_direct_computation(toy_fold):
    means = condition_means(toy_fold / "processed.h5ad", ["non-targeting", "A", "B", "C"], chunk_size=3)
    np.testing.assert_allclose(means.means["non-targeting"], [1, 1, 1])
    np.testing.assert_allclose(means.means["A"], [2, 1, 1])
    np.testing.assert_allclose(means.means["B"], [1, 0.5, 3])
    assert means.n_cells == {"non-targeting": 4, "A": 2, "B": 2, "C": 2}


def test_additive_equals_analytic_value(toy_fold):
    result, pred, means = _run(toy_fold, "additive")
    # A+B: control + (A - ctrl) + (B - ctrl) = [1+1+0, 1+0-0.5, 1+0+2]; every control cell is used
    # once (4 cells drawn from 4 controls without replacement), each moved by the summed delta.
    delta_ab = np.array([1.0, -0.5, 2.0])
    expected_ab = np.clip(CONTROLS + delta_ab, 0, None)
    got_ab = pred[pred.obs["target_gene"] == "A+B"].X.toarray()
    np.testing.assert_allclose(_sorted_rows(got_ab), _sorted_rows(expected_ab), atol=1e-6)
    np.testing.assert_allclose(means.loc["A+B"].to_numpy(), [2.0, 0.5, 3.0], atol=1e-6)
    # B+C: delta [0, -1.5, 2] pushes g1 (controls 1, 1, 0.5, 1.5) to <= 0 everywhere: clamped at 0.
    expected_bc = np.clip(CONTROLS + np.array([0.0, -1.5, 2.0]), 0, None)
    got_bc = pred[pred.obs["target_gene"] == "B+C"].X.toarray()
    np.testing.assert_allclose(_sorted_rows(got_bc), _sorted_rows(expected_bc), atol=1e-6)
    assert got_bc.min() == 0.0
    np.testing.assert_allclose(means.loc["B+C"].to_numpy(), [1.0, 0.0, 3.0], atol=1e-6)
    assert result.fallback_nochange == []
    # The real control cells are carried verbatim.
    ctrl = pred[pred.obs["target_gene"] == "non-targeting"].X.toarray()
    np.testing.assert_allclose(ctrl, CONTROLS, atol=1e-6)


def test_additive_falls_back_to_nochange_for_unseen_single(toy_fold):
    result, pred, means = _run(toy_fold, "additive", extra=["Z+A", "A+B"])
    assert result.fallback_nochange == ["A+Z"]
    assert pred.uns["ccfm_baseline"]["fallback_nochange"] == ["A+Z"]
    assert list(means.index) == ["A+B", "B+C", "A+Z"]
    np.testing.assert_allclose(means.loc["A+Z"].to_numpy(), [1.0, 1.0, 1.0], atol=1e-6)


def test_meanpert_uses_training_perturbations_only(toy_fold):
    _, _, means = _run(toy_fold, "meanpert", n_cells=4)
    # Mean training delta: ([1,0,0] + [0,-0.5,2] + [0,-1,0]) / 3 = [1/3, -0.5, 2/3]; held-out
    # doubles (values 7 and 9) would raise it far above this if they leaked in.
    delta = np.array([1 / 3, -0.5, 2 / 3])
    expected = np.clip(CONTROLS + delta, 0, None).mean(axis=0)
    np.testing.assert_allclose(means.loc["A+B"].to_numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(means.loc["B+C"].to_numpy(), expected, atol=1e-6)


def test_nochange_and_shared_control_draws(toy_fold):
    _, nochange, _ = _run(toy_fold, "nochange", n_cells=3)
    _, additive, _ = _run(toy_fold, "additive", n_cells=3)
    rows = sample_control_rows(4, ["A+B", "B+C"], 3, seed=3)
    got = nochange[nochange.obs["target_gene"] == "A+B"].X.toarray()
    np.testing.assert_allclose(got, CONTROLS[rows["A+B"]], atol=1e-6)
    # Same seed -> the additive baseline shifted exactly the same control cells, re-centred on
    # the additive mean (control mean + delta; a plain clamp at 0 would overshoot it).
    shifted = additive[additive.obs["target_gene"] == "A+B"].X.toarray()
    delta = np.array([1.0, -0.5, 2.0])
    target = np.maximum(CONTROLS.mean(axis=0) + delta, 0)
    np.testing.assert_allclose(shifted, match_mean(CONTROLS[rows["A+B"]] + delta, target), atol=1e-6)
    np.testing.assert_allclose(shifted.mean(axis=0), target, atol=1e-5)
    assert shifted.min() >= 0
    # A different seed draws different cells.
    other = sample_control_rows(4, ["A+B", "B+C"], 3, seed=4)
    assert any(not np.array_equal(rows[k], other[k]) for k in rows)


def test_leaking_split_is_rejected(toy_fold):
    split = json.loads((toy_fold / "split.json").read_text())
    split["train"].append("A+B")
    (toy_fold / "split.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match="both train and test"):
        _run(toy_fold, "meanpert")
