"""More bad inputs (issue 13): each fails in ``preprocess_dataset`` / ``preprocess_target`` (the
entry points of the preprocess rules) with a message naming the file, the problem and the fix,
and leaves no output, not even a temporary file. Accepted variants are checked to really work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from ccfm.data.preprocess import PreprocessSettings, ScaleError, TargetSettings, preprocess_dataset, preprocess_target
from ccfm.data.validation import (
    DuplicateCellsError,
    EmptyInputError,
    EnsemblIdsError,
    InputValidationError,
    LabelParseError,
    NotGeneSymbolsError,
    TargetGenesError,
    UnknownPerturbationError,
    UnsupportedDtypeError,
    is_ensembl_id,
)

N_CELLS, N_GENES = 120, 30
GENES = [f"G{i}" for i in range(N_GENES)]


def _counts(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(1.0, size=(N_CELLS, N_GENES)).astype(np.float32)


def _labels(seed: int = 0, names: tuple[str, ...] = ("non-targeting", "G1", "G2", "G1+G2")) -> np.ndarray:
    return np.random.default_rng(seed).choice(list(names), size=N_CELLS)


def _write(
    path: Path,
    *,
    x: Any = None,
    labels: Any = None,
    var_names: list[str] | None = None,
    cell_names: list[str] | None = None,
    dense: bool = False,
) -> Path:
    x = _counts() if x is None else x
    n = x.shape[0]
    obs = pd.DataFrame(
        {"target_gene": _labels() if labels is None else labels}, index=cell_names or [f"c{i}" for i in range(n)]
    )
    adata = ad.AnnData(X=x if dense else sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=var_names or GENES))
    adata.write_h5ad(path)
    return path


def _as_float16(path: Path, dense: bool) -> Path:
    """Rewrite X as float16, as other tools export it (scipy cannot build such a matrix itself)."""
    with h5py.File(path, "r+") as file:
        key = "X" if dense else "X/data"
        values = file[key][...]
        attrs = dict(file[key].attrs)
        del file[key]
        file.create_dataset(key, data=values.astype(np.float16))
        file[key].attrs.update(attrs)
    return path


def _noninteger_counts(path: Path) -> Path:
    """Ambient-corrected counts: most values whole, a fifth of them slightly reduced."""
    x = _counts()
    rng = np.random.default_rng(1)
    nonzero = np.argwhere(x > 0)
    chosen = nonzero[rng.random(len(nonzero)) < 0.2]
    x[chosen[:, 0], chosen[:, 1]] -= 0.37
    return _write(path, x=x)


def _empty(path: Path) -> Path:
    return _write(path, x=np.zeros((0, N_GENES), np.float32), labels=[], cell_names=[])


def _duplicated_cells(path: Path) -> Path:
    return _write(path, cell_names=[f"c{i % 100}" for i in range(N_CELLS)])


# (builder, preprocess kwargs, exception, message fragments)
CASES: dict[str, tuple[Callable[[Path], Path], dict[str, Any], type[Exception], list[str]]] = {
    "float16_dense": (
        lambda p: _as_float16(_write(p, dense=True), dense=True),
        {},
        UnsupportedDtypeError,
        ["X is stored as float16", "adata.X = adata.X.astype('float32')"],
    ),
    "float16_sparse": (
        lambda p: _as_float16(_write(p), dense=False),
        {},
        UnsupportedDtypeError,
        ["X is stored as float16", "not float16", "write the file again"],
    ),
    "zero_cells": (_empty, {}, EmptyInputError, ["the file is empty", "0 x 30", "no cells", "right file"]),
    "duplicated_cell_names": (
        _duplicated_cells,
        {},
        DuplicateCellsError,
        ["20 cell names occur more than once", "c0 x2", "obs_names_make_unique"],
    ),
    "lower_case_ensembl_ids": (
        lambda p: _write(p, var_names=[f"ensg{i:011d}" for i in range(N_GENES)]),
        {},
        EnsemblIdsError,
        ["Ensembl ids", "ensg00000000000", "HGNC symbols"],
    ),
    "noninteger_counts_under_auto": (
        _noninteger_counts,
        {},
        ScaleError,
        ["are whole numbers", "non-integer counts", "ambient", "input_scale: counts", "never normalised"],
    ),
    "integer_labels_for_a_gene_dataset": (
        lambda p: _write(p, labels=_labels(names=("non-targeting", "1", "2", "17"))),
        {},
        NotGeneSymbolsError,
        [
            "holds numbers",
            "1, 2, 17",
            "the column is not gene symbols",
            "perturbation_column",
            "perturbation_type: drug",
        ],
    ),
    "three_perturbations_in_a_label": (
        lambda p: _write(p, labels=_labels(names=("non-targeting", "G1", "G1+G2+G3"))),
        {},
        LabelParseError,
        ["obs['target_gene']", "names 3 perturbations", "combo_separator"],
    ),
    "drug_predict_entry_not_in_the_data": (
        lambda p: _write(p, labels=_labels(names=("DMSO", "DrugA", "DrugB", "DrugA+DrugB"))),
        {
            "perturbation_type": "drug",
            "control_label": "DMSO",
            "guide_token_pattern": None,
            "predict": ["druga+DrugB", "DrugZ"],
        },
        UnknownPerturbationError,
        ["drug 'druga' is not among the drugs of the data (did you mean 'DrugA'?)", "drug 'DrugZ'", "DrugA, DrugB"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_and_writes_nothing(tmp_path: Path, case: str) -> None:
    build, kwargs, error, fragments = CASES[case]
    raw = build(tmp_path / "raw.h5ad")
    out = tmp_path / "results" / "ds" / "processed.h5ad"
    with pytest.raises(error) as caught:
        preprocess_dataset(raw, out, PreprocessSettings(dataset="ds", n_top_genes=10, chunk_size=32, **kwargs))
    assert isinstance(caught.value, InputValidationError)
    message = str(caught.value)
    assert str(raw) in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert "gene 'Drug" not in message  # drugs are never called genes
    assert not out.exists() and (not out.parent.exists() or list(out.parent.iterdir()) == [])


def test_lower_case_ensembl_ids_are_ids() -> None:
    assert is_ensembl_id("ensg00000141510") and is_ensembl_id("Ensmusg00000000001.3")
    assert not is_ensembl_id("ENSA") and not is_ensembl_id("KLF1")


def test_noninteger_counts_are_normalised_when_configured_as_counts(tmp_path: Path, caplog) -> None:
    raw = _noninteger_counts(tmp_path / "raw.h5ad")
    out = tmp_path / "processed.h5ad"
    with caplog.at_level(logging.WARNING, logger="ccfm.data.preprocess"):
        summary = preprocess_dataset(
            raw, out, PreprocessSettings(dataset="ds", n_top_genes=10, chunk_size=32, input_scale="counts")
        )
    assert summary["input_scale"] == "counts" and "non-integer counts?" in caplog.text
    processed = ad.read_h5ad(out)
    assert processed.layers["counts"].dtype == np.float32
    # Normalised as scanpy would: normalize_total (library size over all genes, 1e4) + log1p, then the kept genes.
    import scanpy as sc

    reference = ad.read_h5ad(raw)
    sc.pp.normalize_total(reference, target_sum=1e4)
    sc.pp.log1p(reference)
    reference = reference[processed.obs_names, processed.var_names]
    assert processed.n_obs == N_CELLS and reference.X.nnz > 0
    np.testing.assert_allclose(processed.X.toarray(), reference.X.toarray(), rtol=1e-5, atol=1e-6)
    counts = ad.read_h5ad(raw)[processed.obs_names, processed.var_names].X.toarray()
    np.testing.assert_array_equal(processed.layers["counts"].toarray(), counts)


def test_drug_predict_entries_are_checked_against_drugs_not_genes(tmp_path: Path) -> None:
    raw = _write(tmp_path / "raw.h5ad", labels=_labels(names=("DMSO", "DrugA", "DrugB", "DrugA+DrugB")))
    out = tmp_path / "processed.h5ad"
    summary = preprocess_dataset(
        raw,
        out,
        PreprocessSettings(
            dataset="ds",
            n_top_genes=10,
            chunk_size=32,
            perturbation_type="drug",
            control_label="DMSO",
            guide_token_pattern=None,
            predict=["DrugA+DrugB", "DrugB"],
        ),
    )
    assert summary["n_genes"] == 10  # a drug is not a gene column to keep
    # the target's predict entries too (drugs of the source or of the target)
    target = _write(tmp_path / "target.h5ad", labels=_labels(1, names=("DMSO", "DrugA", "DrugC")))
    preprocess_target(
        target,
        out,
        tmp_path / "target_processed.h5ad",
        TargetSettings(
            dataset="ds",
            chunk_size=32,
            perturbation_type="drug",
            control_label="DMSO",
            guide_token_pattern=None,
            predict=["DrugB", "DrugC"],
        ),
    )
    assert (tmp_path / "target_processed.h5ad").exists()


def test_numeric_drug_names_are_fine(tmp_path: Path) -> None:
    raw = _write(tmp_path / "raw.h5ad", labels=_labels(names=("0", "101", "202", "101+202")))
    summary = preprocess_dataset(
        raw,
        tmp_path / "p.h5ad",
        PreprocessSettings(
            dataset="ds",
            n_top_genes=10,
            chunk_size=32,
            perturbation_type="drug",
            control_label="0",
            guide_token_pattern=None,
        ),
    )
    assert summary["conditions"] == {"control": 1, "single": 2, "double": 1}


def _processed(tmp_path: Path) -> Path:
    out = tmp_path / "processed.h5ad"
    preprocess_dataset(
        _write(tmp_path / "raw.h5ad"), out, PreprocessSettings(dataset="ds", n_top_genes=10, chunk_size=32)
    )
    return out


@pytest.mark.parametrize(
    ("target_genes", "fragments"),
    [
        ([g.lower() for g in GENES], ["shares only 0 of the", "match when case is ignored", "min_shared_genes"]),
        ([f"X{i}" for i in range(N_GENES)], ["shares only 0 of the", "below the minimum 50%", "same species"]),
    ],
)
def test_target_sharing_few_genes_fails(tmp_path: Path, target_genes: list[str], fragments: list[str]) -> None:
    processed = _processed(tmp_path)
    target = _write(tmp_path / "target_raw.h5ad", var_names=target_genes)
    out = tmp_path / "out" / "target_processed.h5ad"
    with pytest.raises(TargetGenesError) as caught:
        preprocess_target(target, processed, out, TargetSettings(dataset="ds", chunk_size=32))
    message = str(caught.value)
    assert str(target) in message and str(processed) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert not out.exists() and (not out.parent.exists() or list(out.parent.iterdir()) == [])


def test_target_overlap_threshold_is_configurable(tmp_path: Path) -> None:
    processed = _processed(tmp_path)
    kept = list(ad.read_h5ad(processed, backed="r").var_names)
    # the target measures 3 of the processed genes (plus others)
    target = _write(tmp_path / "target_raw.h5ad", var_names=kept[:3] + [f"X{i}" for i in range(N_GENES - 3)])
    out = tmp_path / "target_processed.h5ad"
    with pytest.raises(TargetGenesError, match="shares only 3 of the"):
        preprocess_target(target, processed, out, TargetSettings(dataset="ds", chunk_size=32, min_shared_genes=0.5))
    summary = preprocess_target(
        target, processed, out, TargetSettings(dataset="ds", chunk_size=32, min_shared_genes=0.2)
    )
    assert len(summary["genes_absent"]) == len(kept) - 3


def test_target_with_duplicated_cell_names_fails(tmp_path: Path) -> None:
    processed = _processed(tmp_path)
    target = _duplicated_cells(tmp_path / "target_raw.h5ad")
    out = tmp_path / "out" / "target_processed.h5ad"
    with pytest.raises(DuplicateCellsError, match="target_raw.h5ad: 20 cell names occur more than once"):
        preprocess_target(target, processed, out, TargetSettings(dataset="ds", chunk_size=32))
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_empty_target_says_the_file_is_empty(tmp_path: Path) -> None:
    processed = _processed(tmp_path)
    target = _empty(tmp_path / "target_raw.h5ad")
    with pytest.raises(EmptyInputError, match="target_raw.h5ad: the file is empty"):
        preprocess_target(target, processed, tmp_path / "out" / "t.h5ad", TargetSettings(dataset="ds", chunk_size=32))


def test_float16_counts_layer_is_refused_but_an_unused_float16_layer_is_not(tmp_path: Path) -> None:
    raw = tmp_path / "raw.h5ad"
    adata = ad.AnnData(
        X=sp.csr_matrix(np.log1p(_counts())),
        obs=pd.DataFrame({"target_gene": _labels()}, index=[f"c{i}" for i in range(N_CELLS)]),
        var=pd.DataFrame(index=GENES),
        layers={"counts": sp.csr_matrix(_counts()), "spliced": sp.csr_matrix(_counts())},
    )
    adata.write_h5ad(raw)
    with h5py.File(raw, "r+") as file:  # an unused layer in float16: irrelevant
        values = file["layers/spliced/data"][...]
        del file["layers/spliced/data"]
        file["layers/spliced/data"] = values.astype(np.float16)
    summary = preprocess_dataset(
        raw, tmp_path / "ok.h5ad", PreprocessSettings(dataset="ds", n_top_genes=10, chunk_size=32)
    )
    assert summary["input_scale"] == "counts"  # read from layers['counts']
    with h5py.File(raw, "r+") as file:
        values = file["layers/counts/data"][...]
        del file["layers/counts/data"]
        file["layers/counts/data"] = values.astype(np.float16)
    out = tmp_path / "out" / "processed.h5ad"
    with pytest.raises(UnsupportedDtypeError, match=r"layers/counts is stored as float16.*adata.layers\['counts'\] = "):
        preprocess_dataset(raw, out, PreprocessSettings(dataset="ds", n_top_genes=10, chunk_size=32))
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
