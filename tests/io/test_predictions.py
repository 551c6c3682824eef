"""The prediction file contract: writer, reader, validation against the real data."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from ccfm.io.predictions import (
    PredictionError,
    align_prediction_to_real,
    read_expression_h5ad,
    read_prediction_means,
    write_predictions,
)

GENES = ["G1", "G2", "G3", "G4"]


def _predicted(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "A": rng.uniform(0, 3, size=(5, 4)),
        "A+B": rng.uniform(0, 3, size=(3, 4)),
    }


def _real(perts: list[str]) -> ad.AnnData:
    labels = ["non-targeting"] * 4 + [p for p in perts for _ in range(2)]
    obs = pd.DataFrame({"target_gene": labels}, index=[f"c{i}" for i in range(len(labels))])
    x = np.full((len(labels), 4), 0.5, dtype=np.float32)
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=GENES))


def test_write_and_read_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    predicted = _predicted(rng)
    controls = sp.csr_matrix(rng.uniform(0, 2, size=(6, 4)).astype(np.float32))
    write_predictions(tmp_path / "pred.h5ad", tmp_path / "pred_means.csv", GENES, predicted, controls)

    adata = read_expression_h5ad(tmp_path / "pred.h5ad")
    assert list(adata.var_names) == GENES
    assert adata.n_obs == 5 + 3 + 6
    counts = adata.obs["target_gene"].value_counts()
    assert counts["A"] == 5 and counts["A+B"] == 3 and counts["non-targeting"] == 6
    assert sp.issparse(adata.X) and adata.X.dtype == np.float32
    # Cells keep their values and the real controls are carried verbatim.
    a_rows = adata[adata.obs["target_gene"] == "A"].X.toarray()
    np.testing.assert_allclose(a_rows, predicted["A"].astype(np.float32))
    ctrl_rows = adata[adata.obs["target_gene"] == "non-targeting"].X.toarray()
    np.testing.assert_allclose(ctrl_rows, controls.toarray())

    means = read_prediction_means(tmp_path / "pred_means.csv")
    assert list(means.columns) == GENES
    assert list(means.index) == ["A", "A+B"]
    np.testing.assert_allclose(means.loc["A+B"].to_numpy(), predicted["A+B"].mean(axis=0), rtol=1e-6)
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.h5ad", "pred_means.csv"]


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.full((2, 4), -0.5), "negative"),
        (np.full((2, 4), np.nan), "NaN"),
        (np.ones((2, 3)), "matching the gene list"),
        (np.full((2, 4), 20.0), "log1p"),
    ],
)
def test_writer_rejects_invalid_values(tmp_path, bad, message):
    with pytest.raises(PredictionError, match=message):
        write_predictions(tmp_path / "p.h5ad", tmp_path / "m.csv", GENES, {"A": bad}, np.ones((2, 4)))
    assert not (tmp_path / "p.h5ad").exists()


def test_writer_rejects_control_as_prediction(tmp_path):
    with pytest.raises(PredictionError, match="control label"):
        write_predictions(
            tmp_path / "p.h5ad", tmp_path / "m.csv", GENES, {"non-targeting": np.ones((2, 4))}, np.ones((2, 4))
        )


def test_align_drops_unscorable_extras_and_errors_on_missing(tmp_path):
    rng = np.random.default_rng(1)
    predicted = {**_predicted(rng), "C+D": rng.uniform(0, 1, size=(2, 4))}
    write_predictions(tmp_path / "pred.h5ad", tmp_path / "m.csv", GENES, predicted, np.ones((3, 4)))
    pred = read_expression_h5ad(tmp_path / "pred.h5ad")

    aligned = align_prediction_to_real(pred, _real(["A", "A+B"]))
    assert set(aligned.obs["target_gene"]) == {"A", "A+B", "non-targeting"}
    assert aligned.n_obs == 5 + 3 + 3

    with pytest.raises(PredictionError, match=r"not predicted: \['B'\]"):
        align_prediction_to_real(pred, _real(["A", "A+B", "B"]))


def test_align_rejects_gene_order_mismatch(tmp_path):
    rng = np.random.default_rng(2)
    write_predictions(tmp_path / "pred.h5ad", tmp_path / "m.csv", GENES, _predicted(rng), np.ones((3, 4)))
    pred = read_expression_h5ad(tmp_path / "pred.h5ad")
    real = _real(["A", "A+B"])
    real.var_names = GENES[::-1]
    with pytest.raises(PredictionError, match="var_names differ"):
        align_prediction_to_real(pred, real)
