"""Preprocessing (ccfm.data.preprocess) and streaming h5ad I/O (ccfm.io.h5ad)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from ccfm.data.conditions import CONTROL
from ccfm.data.gene_selection import select_genes, seurat_dispersion, top_genes
from ccfm.data.moments import RunningMoments
from ccfm.data.preprocess import (
    PreprocessSettings,
    ScaleError,
    TargetSettings,
    detect_input_scale,
    preprocess_dataset,
    preprocess_target,
    resolve_input_scale,
)
from ccfm.data.splits import SplitSettings
from ccfm.data.validation import InvalidValuesError
from ccfm.data.writing import InputMatrix
from ccfm.io.atomic import atomic_output
from ccfm.io.h5ad import CSRH5adWriter, iter_row_chunks, read_obs, read_var


def _reference_log1p(adata: ad.AnnData, target_sum: float = 1e4) -> ad.AnnData:
    reference = adata.copy()
    sc.pp.normalize_total(reference, target_sum=target_sum)
    sc.pp.log1p(reference)
    return reference


# ---------------------------------------------------------------- h5io


def _counts_file(path: Path, n_cells: int = 257, n_genes: int = 40, layout: str = "csr", seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(0.6, size=(n_cells, n_genes)).astype(np.float32)
    labels = rng.choice(["non-targeting", "G1", "G2", "G1+G2"], size=n_cells)
    adata = ad.AnnData(
        X={"dense": counts, "csr": sp.csr_matrix(counts), "csc": sp.csc_matrix(counts)}[layout],
        obs=pd.DataFrame({"target_gene": labels}, index=[f"c{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]),
    )
    adata.write_h5ad(path)
    return adata


@pytest.mark.parametrize("layout", ["csr", "dense", "csc"])
def test_chunked_reading_matches_in_memory(tmp_path: Path, layout: str) -> None:
    path = tmp_path / "x.h5ad"
    adata = _counts_file(path, layout=layout)
    dense_x = np.asarray(adata.X if layout == "dense" else adata.X.toarray())
    chunks = list(iter_row_chunks(path, chunk_size=50))
    assert [start for start, _ in chunks] == list(range(0, 257, 50))  # larger than one chunk
    assert all(isinstance(c, sp.csr_matrix) for _, c in chunks)
    np.testing.assert_array_equal(sp.vstack([c for _, c in chunks]).toarray(), dense_x)
    rows = np.array([0, 3, 49, 50, 51, 120, 256])
    picked = list(iter_row_chunks(path, chunk_size=50, rows=rows))
    np.testing.assert_array_equal(sp.vstack([c for _, c in picked]).toarray(), dense_x[rows])
    assert [start for start, _ in picked] == [0, 3, 5, 6]  # positions within `rows`
    assert list(read_obs(path)["target_gene"]) == list(adata.obs["target_gene"])
    assert list(read_var(path).index) == list(adata.var_names)
    with pytest.raises(ValueError, match="strictly increasing"):
        list(iter_row_chunks(path, 50, rows=np.array([5, 2])))


def test_csr_writer_roundtrip_and_atomicity(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    blocks = [sp.random(n, 7, density=0.3, format="csr", dtype=np.float32, random_state=rng) for n in (5, 0, 9)]
    var = pd.DataFrame({"flag": [True] * 7}, index=[f"g{i}" for i in range(7)])
    obs = pd.DataFrame({"target_gene": ["a"] * 14}, index=[f"c{i}" for i in range(14)])
    out = tmp_path / "w.h5ad"
    with atomic_output(out) as tmp, CSRH5adWriter(tmp, var, layers=["counts"]) as writer:
        for block in blocks:
            writer.append(block, layers={"counts": block * 2})
        writer.finish(obs, uns={"ccfm": {"k": 1}})
    back = ad.read_h5ad(out)
    expected = sp.vstack(blocks).toarray()
    np.testing.assert_allclose(back.X.toarray(), expected)
    np.testing.assert_allclose(back.layers["counts"].toarray(), 2 * expected)
    assert back.uns["ccfm"]["k"] == 1 and list(back.var_names) == list(var.index)
    # a failure inside the block leaves neither the output nor a temporary file behind
    failed = tmp_path / "failed.h5ad"
    with pytest.raises(ValueError, match="obs has 3 rows"):
        with atomic_output(failed) as tmp, CSRH5adWriter(tmp, var) as writer:
            writer.append(blocks[0])
            writer.finish(obs.iloc[:3])
    assert not failed.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["w.h5ad"]


def test_running_moments_match_numpy() -> None:
    rng = np.random.default_rng(2)
    data = rng.gamma(0.5, 3.0, size=(301, 13)) * (rng.random((301, 13)) < 0.4)
    moments = RunningMoments.empty(13)
    for start in range(0, 301, 64):
        moments.update(sp.csr_matrix(data[start : start + 64]))
    np.testing.assert_allclose(moments.mean, data.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.variance(), data.var(axis=0, ddof=1), rtol=1e-10)


# ---------------------------------------------------------------- scale detection


def test_scale_detection_and_contradiction(tmp_path: Path) -> None:
    counts_path = tmp_path / "counts.h5ad"
    adata = _counts_file(counts_path)
    assert detect_input_scale(counts_path) == "counts"
    logged = _reference_log1p(adata)
    log_path = tmp_path / "log.h5ad"
    logged.write_h5ad(log_path)
    assert detect_input_scale(log_path) == "log1p"
    assert resolve_input_scale("auto", "log1p", log_path) == "log1p"
    with pytest.raises(ScaleError, match="look like log1p"):
        resolve_input_scale("counts", detect_input_scale(log_path), log_path)
    with pytest.raises(ScaleError, match="input_scale: counts"):
        preprocess_dataset(
            log_path, tmp_path / "p.h5ad", PreprocessSettings(dataset="t", input_scale="counts", n_top_genes=10)
        )
    scaled = logged.copy()
    scaled.X = sp.csr_matrix(scaled.X.toarray() - 0.5)
    scaled.write_h5ad(tmp_path / "scaled.h5ad")
    with pytest.raises(ScaleError, match="negative values"):
        detect_input_scale(tmp_path / "scaled.h5ad")


def test_log1p_input_with_counts_layer_uses_counts(tmp_path: Path) -> None:
    adata = _counts_file(tmp_path / "c.h5ad")
    both = _reference_log1p(adata)
    both.layers["counts"] = adata.X.copy()
    both.write_h5ad(tmp_path / "both.h5ad")
    summary = preprocess_dataset(
        tmp_path / "both.h5ad", tmp_path / "p.h5ad", PreprocessSettings(dataset="t", n_top_genes=40)
    )
    assert summary["input_scale"] == "counts"
    out = ad.read_h5ad(tmp_path / "p.h5ad")
    np.testing.assert_allclose(out.layers["counts"].toarray(), adata.X.toarray())
    np.testing.assert_allclose(out.X.toarray(), both.X.toarray(), atol=1e-5)


def test_log1p_only_input_is_kept_without_counts_layer(tmp_path: Path) -> None:
    adata = _counts_file(tmp_path / "c.h5ad")
    logged = _reference_log1p(adata)
    logged.write_h5ad(tmp_path / "log.h5ad")
    summary = preprocess_dataset(
        tmp_path / "log.h5ad", tmp_path / "p.h5ad", PreprocessSettings(dataset="t", n_top_genes=40, chunk_size=64)
    )
    out = ad.read_h5ad(tmp_path / "p.h5ad")
    assert summary["input_scale"] == "log1p" and "counts" not in out.layers
    np.testing.assert_allclose(out.X.toarray(), logged.X.toarray(), atol=1e-6)


# ---------------------------------------------------------------- real datasets


def test_preprocess_datlinger_matches_scanpy(datlinger_h5ad: Path, tmp_path: Path) -> None:
    out = tmp_path / "processed.h5ad"
    summary = preprocess_dataset(
        datlinger_h5ad,
        out,
        PreprocessSettings(
            dataset="datlinger",
            perturbation_column="perturbation",
            control_label="control",
            combo_separator="_",
            n_top_genes=300,
            chunk_size=1000,
        ),
    )
    processed = ad.read_h5ad(out)
    raw = ad.read_h5ad(datlinger_h5ad)
    assert processed.n_obs == raw.n_obs == 7500 and summary["input_scale"] == "counts"
    # labels: guide-level "ZAP70_1" -> single "ZAP70"; controls canonical
    assert set(processed.obs["condition_type"]) == {"control", "single"}
    assert (processed.obs["target_gene"] == CONTROL).sum() == (raw.obs["perturbation"] == "control").sum()
    assert "ZAP70" in set(processed.obs["target_gene"])
    assert list(processed.obs["original_condition"]) == list(raw.obs["perturbation"].astype(str))
    # genes: scanpy's Seurat HVGs (computed in memory) plus every perturbed gene present, input order
    reference = _reference_log1p(raw)
    sc.pp.highly_variable_genes(reference, n_top_genes=300, flavor="seurat")
    expected_hvg = set(reference.var_names[reference.var["highly_variable"]])
    assert set(processed.var_names[processed.var["highly_variable"]]) == expected_hvg
    targets = {g for g in processed.obs["target_gene"].astype(str) if g != CONTROL}
    present = targets & set(raw.var_names)
    assert present and present <= set(processed.var_names)
    assert set(processed.var_names[processed.var["perturbed"]]) == present
    assert set(processed.var_names) == expected_hvg | present
    order = [list(raw.var_names).index(g) for g in processed.var_names]
    assert order == sorted(order)
    # values: log1p(normalize_total) over all genes, CSR float32; counts layer = raw counts
    assert sp.issparse(processed.X) and processed.X.dtype == np.float32
    np.testing.assert_allclose(processed.X.toarray(), reference[:, processed.var_names].X.toarray(), atol=1e-5)
    np.testing.assert_array_equal(processed.layers["counts"].toarray(), raw[:, processed.var_names].X.toarray())
    assert processed.X.max() < 15 and processed.X.min() >= 0
    assert processed.uns["ccfm"]["dataset"] == "datlinger" and processed.uns["ccfm"]["target_sum"] == 1e4


def test_preprocess_papalexi_keeps_perturbed_genes(papalexi_h5ad: Path, tmp_path: Path) -> None:
    out = tmp_path / "processed.h5ad"
    summary = preprocess_dataset(
        papalexi_h5ad,
        out,
        PreprocessSettings(
            dataset="papalexi",
            perturbation_column="target",
            control_label="non-targeting",
            n_top_genes=20,
            chunk_size=5000,
        ),
    )
    processed = ad.read_h5ad(out, backed="r")
    raw_var = set(ad.read_h5ad(papalexi_h5ad, backed="r").var_names)
    targets = {g for g in processed.obs["target_gene"].astype(str) if g != CONTROL}
    present = targets & raw_var
    assert present <= set(processed.var_names)
    assert processed.var["highly_variable"].sum() == 20
    assert processed.n_vars == len(set(processed.var_names[processed.var["highly_variable"]]) | present)
    # perturbed genes outside the HVGs were added, not dropped
    assert (processed.var["perturbed"] & ~processed.var["highly_variable"]).sum() > 0
    assert sorted(summary["perturbed_absent"]) == sorted(targets - raw_var)
    # Every cell is kept and every control stays a control: counted in the raw file's obs["target"]
    # (20,729 cells, as its name says; 2,386 of them 'non-targeting').
    raw = ad.read_h5ad(papalexi_h5ad, backed="r")
    raw_controls = int((raw.obs["target"].astype(str) == "non-targeting").sum())
    assert (raw.n_obs, raw_controls) == (20729, 2386)
    assert processed.n_obs == raw.n_obs and (processed.obs["target_gene"] == CONTROL).sum() == raw_controls


def test_missing_perturbation_column_names_the_fix(tmp_path: Path) -> None:
    _counts_file(tmp_path / "c.h5ad")
    with pytest.raises(KeyError, match="perturbation_column"):
        preprocess_dataset(
            tmp_path / "c.h5ad", tmp_path / "p.h5ad", PreprocessSettings(dataset="t", perturbation_column="condition")
        )


# ---------------------------------------------------------------- target context


def test_preprocess_target_aligns_genes(tmp_path: Path) -> None:
    _counts_file(tmp_path / "src.h5ad", n_cells=120, n_genes=30, seed=3)
    preprocess_dataset(
        tmp_path / "src.h5ad",
        tmp_path / "processed.h5ad",
        PreprocessSettings(dataset="t", n_top_genes=12, chunk_size=50),
    )
    genes = list(ad.read_h5ad(tmp_path / "processed.h5ad", backed="r").var_names)
    target = _counts_file(tmp_path / "tmp.h5ad", n_cells=90, n_genes=30, seed=4)
    dropped = genes[1]
    keep = [g for g in target.var_names if g != dropped][::-1]  # another order, one gene missing
    target[:, keep].copy().write_h5ad(tmp_path / "target_raw.h5ad")
    summary = preprocess_target(
        tmp_path / "target_raw.h5ad",
        tmp_path / "processed.h5ad",
        tmp_path / "target_processed.h5ad",
        TargetSettings(dataset="t", chunk_size=40),
    )
    out = ad.read_h5ad(tmp_path / "target_processed.h5ad")
    assert list(out.var_names) == genes and summary["genes_absent"] == [dropped]
    reference = _reference_log1p(target[:, keep].copy())
    for j, gene in enumerate(genes):
        column = out.X[:, j].toarray().ravel()
        if gene == dropped:
            assert not column.any()
        else:
            np.testing.assert_allclose(column, reference[:, gene].X.toarray().ravel(), atol=1e-5)
    assert list(out.obs["target_gene"]) == list(target.obs["target_gene"])


def test_settings_take_every_default_from_the_schema() -> None:
    from ccfm.config import dataset_defaults, load_schema, section_defaults

    preprocess, split, dataset = section_defaults("preprocess"), section_defaults("split"), dataset_defaults()
    source, target = PreprocessSettings(dataset="d"), TargetSettings(dataset="d")
    assert (source.n_top_genes, source.target_sum, source.chunk_size) == (
        preprocess["n_top_genes"],
        preprocess["target_sum"],
        preprocess["chunk_size"],
    )
    assert (target.target_sum, target.chunk_size) == (preprocess["target_sum"], preprocess["chunk_size"])
    for key in ("perturbation_column", "control_label", "combo_separator", "input_scale", "perturbation_type"):
        assert getattr(source, key) == getattr(target, key) == dataset[key], key
    target_schema = load_schema()["$defs"]["dataset"]["properties"]["target"]["properties"]
    assert target.min_shared_genes == target_schema["min_shared_genes"]["default"]
    fold = SplitSettings(seed=1)
    assert (fold.heldout_fraction, fold.n_folds, fold.min_cells_per_perturbation, fold.chunk_size) == (
        split["heldout_fraction"],
        split["n_folds"],
        split["min_cells_per_perturbation"],
        preprocess["chunk_size"],
    )
    # The rule's settings mapping is taken as it is: a misspelt key is an error naming it.
    with pytest.raises(TypeError, match="n_top_genez"):
        PreprocessSettings(dataset="d", n_top_genez=5)


def test_select_genes_keeps_the_most_dispersed_and_every_perturbed_and_requested_gene_in_input_order() -> None:
    rng = np.random.default_rng(3)
    counts = rng.poisson(rng.uniform(0.5, 20.0, size=12), size=(200, 12)).astype(np.float64)
    counts[:, 2] = 0.0  # never expressed: no dispersion, never among the most dispersed
    moments = RunningMoments.empty(12)
    moments.update(sp.csr_matrix(np.log1p(counts)))
    genes = pd.Index([f"g{i}" for i in range(12)])
    selection = select_genes(moments, 3, genes, perturbed=["g9", "absent"], requested=["g2"])
    dispersion = seurat_dispersion(moments.mean, moments.variance())[1]
    most_dispersed = np.flatnonzero(top_genes(dispersion, 3))
    assert most_dispersed.size == 3 and 2 not in most_dispersed
    assert selection.keep.tolist() == sorted({*most_dispersed.tolist(), 9, 2})
    assert selection.never_expressed.tolist() == [i == 2 for i in range(12)]
    var = selection.var(pd.DataFrame(index=genes))
    assert var.index.tolist() == genes[selection.keep].tolist()
    assert var["perturbed"].tolist() == [gene == "g9" for gene in var.index]
    assert int(var["highly_variable"].sum()) == 3 and not var.loc["g2", "highly_variable"]
    assert np.flatnonzero(selection.modelled()).tolist() == selection.keep.tolist()


def test_input_matrix_streams_every_row_once_and_checks_each_chunk(tmp_path: Path) -> None:
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    ad.AnnData(sp.csr_matrix(x)).write_h5ad(tmp_path / "ok.h5ad")
    matrix = InputMatrix(tmp_path / "ok.h5ad", None, "counts", 4)
    chunks = list(matrix.chunks())
    assert matrix.n_chunks == 3 and [start for start, _ in chunks] == [0, 4, 8]
    np.testing.assert_array_equal(sp.vstack([chunk for _, chunk in chunks]).toarray(), x)
    x[9, 1] = np.nan
    ad.AnnData(sp.csr_matrix(x)).write_h5ad(tmp_path / "nan.h5ad")
    with pytest.raises(InvalidValuesError, match="NaN"):
        list(InputMatrix(tmp_path / "nan.h5ad", None, "counts", 4).chunks())
