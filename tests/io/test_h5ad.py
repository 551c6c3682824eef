"""Selective readers of ccfm.io.h5ad: rows of X, labels and cell names without the rest of the file."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from ccfm.io import h5ad as h5io

N_CELLS, N_GENES = 503, 31


def _write(path: Path, dense: bool = False) -> ad.AnnData:
    """CSR (or dense) X with empty rows, a counts layer, categorical labels with a missing value."""
    rng = np.random.default_rng(0)
    x = sp.random_array((N_CELLS, N_GENES), density=0.2, format="csr", dtype=np.float32, rng=rng)
    kept = np.ones(N_CELLS, dtype=np.float32)
    kept[10:20] = 0  # rows without stored entries
    x = sp.csr_matrix(sp.diags_array(kept) @ x)
    x.eliminate_zeros()
    labels = pd.Categorical(rng.choice(["non-targeting", "A", "B", "A+B"], N_CELLS))
    labels[5] = np.nan
    obs = pd.DataFrame(
        {"target_gene": labels, "batch": rng.choice(["b1", "b2"], N_CELLS).astype(object)},
        index=[f"cell{i}" for i in range(N_CELLS)],
    )
    adata = ad.AnnData(
        X=x.toarray() if dense else x,
        obs=obs,
        var=pd.DataFrame(index=[f"G{i}" for i in range(N_GENES)]),
        layers={"counts": sp.csr_matrix(x * 3)},
    )
    adata.write_h5ad(path)
    return adata


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 100, 10000])
def test_read_csr_rows_equals_indexing_the_whole_matrix(tmp_path: Path, dense: bool, chunk_size: int) -> None:
    adata = _write(tmp_path / "a.h5ad", dense)
    expected = sp.csr_matrix(adata.X)
    rng = np.random.default_rng(1)
    selections = [
        np.sort(rng.choice(N_CELLS, 60, replace=False)),
        np.arange(N_CELLS),
        np.arange(10, 20),
        np.array([0, N_CELLS - 1]),
        np.zeros(0, dtype=np.int64),
    ]
    for rows in selections:
        got = h5io.read_csr_rows(tmp_path / "a.h5ad", rows, chunk_size)
        assert sp.issparse(got) and got.dtype == np.float32 and got.shape == (rows.size, N_GENES)
        np.testing.assert_array_equal(got.toarray(), expected[rows].toarray())
    counts = h5io.read_csr_rows(tmp_path / "a.h5ad", selections[0], chunk_size, layer="counts")
    np.testing.assert_array_equal(counts.toarray(), adata.layers["counts"][selections[0]].toarray())


def test_read_csr_rows_refuses_unsorted_or_out_of_range_rows(tmp_path: Path) -> None:
    _write(tmp_path / "a.h5ad")
    for rows in (np.array([3, 2]), np.array([1, 1]), np.array([N_CELLS])):
        with pytest.raises(ValueError, match="strictly increasing"):
            h5io.read_csr_rows(tmp_path / "a.h5ad", rows)


def test_read_obs_labels_and_names_match_the_obs_table(tmp_path: Path) -> None:
    adata = _write(tmp_path / "a.h5ad")
    labels = h5io.read_obs_labels(tmp_path / "a.h5ad", "target_gene")
    np.testing.assert_array_equal(labels, adata.obs["target_gene"].astype(str).to_numpy())
    assert labels[5] == "nan" and labels.dtype == object
    # one shared string object per category, not one per cell
    assert len({id(label) for label in labels}) == 5
    np.testing.assert_array_equal(h5io.read_obs_labels(tmp_path / "a.h5ad", "batch"), adata.obs["batch"].to_numpy())
    with pytest.raises(KeyError, match="no column 'perturbation'.*target_gene"):
        h5io.read_obs_labels(tmp_path / "a.h5ad", "perturbation")
    rows = np.array([0, 7, 250, N_CELLS - 1])
    assert h5io.read_obs_names(tmp_path / "a.h5ad", rows) == ["cell0", "cell7", "cell250", f"cell{N_CELLS - 1}"]
    assert h5io.read_obs_names(tmp_path / "a.h5ad", np.zeros(0, dtype=np.int64)) == []


def test_read_rows_with_labels_keeps_only_the_selected_cells(tmp_path: Path) -> None:
    adata = _write(tmp_path / "a.h5ad")
    picked = h5io.read_rows_with_labels(
        tmp_path / "a.h5ad", lambda labels: np.isin(labels, ["A", "A+B"]), chunk_size=50
    )
    mask = adata.obs["target_gene"].astype(str).isin(["A", "A+B"]).to_numpy()
    np.testing.assert_array_equal(picked.matrix.toarray(), adata.X[mask].toarray())
    assert picked.cell_names == list(adata.obs_names[mask]) and set(picked.labels) == {"A", "A+B"}
    assert picked.genes == list(adata.var_names)


def test_read_obs_subset_reads_the_columns_of_the_given_rows(tmp_path: Path) -> None:
    adata = _write(tmp_path / "a.h5ad")
    assert h5io.obs_columns(tmp_path / "a.h5ad") == ["target_gene", "batch"]
    rows = np.array([1, 5, 64, 400])
    subset = h5io.read_obs_subset(tmp_path / "a.h5ad", rows, ["batch", "target_gene", "absent"])
    assert list(subset.columns) == ["batch", "target_gene"] and list(subset.index) == list(adata.obs_names[rows])
    assert isinstance(subset["target_gene"].dtype, pd.CategoricalDtype)
    assert subset["target_gene"].astype(str).tolist() == adata.obs["target_gene"].astype(str).iloc[rows].tolist()
    assert subset["batch"].astype(str).tolist() == adata.obs["batch"].iloc[rows].tolist()
