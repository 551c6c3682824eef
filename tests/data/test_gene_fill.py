"""Every gene of the input in real.h5ad and the prediction files (issue 21, ccfm.data.gene_fill)."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from ccfm.data.conditions import CONTROL
from ccfm.data.gene_fill import (
    GeneFill,
    drawn_sources,
    expand_prediction_files,
    predictions_on_all_genes,
    read_gene_table,
)
from ccfm.data.preprocess import PreprocessSettings, normalize_log1p, preprocess_dataset
from ccfm.data.splits import FoldChecks, SplitSettings, split_to_files
from ccfm.io.h5ad import read_control_cells
from ccfm.io.predictions import read_expression_h5ad, write_predictions
from public_files import write_public_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_public_files(tmp_path_factory.mktemp("public"))


@pytest.fixture(scope="module")
def counts_run(files, tmp_path_factory):
    """The scPerturb-style counts file preprocessed with 60 top genes and split (fold 1)."""
    out = tmp_path_factory.mktemp("counts_run")
    preprocess_dataset(
        files.scperturb,
        out / "processed.h5ad",
        PreprocessSettings(
            dataset="x",
            perturbation_column="perturbation",
            control_label="control",
            combo_separator="_",
            n_top_genes=60,
            predict=files.predict,
        ),
        genes_tsv=out / "genes.tsv",
    )
    split = split_to_files(
        out / "processed.h5ad",
        out / "fold1.json",
        out / "real.h5ad",
        fold=1,
        settings=SplitSettings(seed=42, heldout_fraction=0.3, n_folds=5, min_cells_per_perturbation=1),
        checks=FoldChecks(cell_eval_profile="full", batch_size=16),
        genes_tsv=out / "genes.tsv",
        raw=files.scperturb,
    )
    return out, split


def _normalised_raw(path: Path) -> np.ndarray:
    raw = ad.read_h5ad(path)
    counts = raw.X.tocsr()
    return normalize_log1p(counts, np.asarray(counts.sum(axis=1)).ravel(), 1e4).toarray()


def test_gene_table_and_log_say_what_is_modelled_and_what_is_never_expressed(files, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="ccfm.data.preprocess"):
        summary = preprocess_dataset(
            files.gears,
            tmp_path / "processed.h5ad",
            PreprocessSettings(dataset="gears", perturbation_column="condition", control_label="ctrl"),
            genes_tsv=tmp_path / "genes.tsv",
        )
    table = read_gene_table(tmp_path / "genes.tsv")
    assert list(table["gene"]) == files.genes  # every input gene, in the file's order
    never = table.loc[table["gene_status"] == "never_expressed", "gene"]
    assert sorted(never) == sorted(files.never_expressed)
    assert summary["genes"] == {"input": 134, "modelled": 104, "never_expressed": 30, "not_selected": 0}
    assert "30 of the input's 134 genes are never expressed" in caplog.text
    assert "finite dispersion" not in caplog.text
    assert "134 genes in the input: 104 modelled; 30 never expressed" in caplog.text


def test_real_h5ad_carries_every_gene_in_input_order(files, counts_run) -> None:
    out, split = counts_run
    real = ad.read_h5ad(out / "real.h5ad")
    processed = ad.read_h5ad(out / "processed.h5ad")
    assert list(real.var_names) == files.genes and split["genes"]["not_selected"] > 0
    rows = processed.obs["target_gene"].astype(str).isin([*split["test"], CONTROL]).to_numpy()
    dense = real.X.toarray()
    modelled = real.var["modelled"].to_numpy()
    np.testing.assert_array_equal(dense[:, modelled], processed.X[rows].toarray())
    full = _normalised_raw(files.scperturb)[rows]
    np.testing.assert_allclose(dense, full, rtol=1e-6, atol=1e-6)  # the cells' own values for every gene
    assert not dense[:, real.var["gene_status"].to_numpy() == "never_expressed"].any()
    # readers that model or score see the modelled genes only
    assert read_expression_h5ad(out / "real.h5ad").n_vars == int(modelled.sum())
    assert read_control_cells(out / "real.h5ad").genes == list(processed.var_names)
    assert len(read_control_cells(out / "real.h5ad", all_genes=True).genes) == len(files.genes)


def _modelled_prediction(out: Path, folder: Path, with_sources: bool) -> tuple[Path, dict[str, np.ndarray], np.ndarray]:
    controls = read_control_cells(out / "processed.h5ad")
    rng = np.random.default_rng(0)
    predicted = {"CDKN1A+CEBPA": rng.uniform(0, 2, size=(5, len(controls.genes))).astype(np.float32)}
    write_predictions(folder / "m.h5ad", folder / "m.csv", controls.genes, predicted, controls.matrix)
    sources = np.array([3, 0, 7, 7, 1])
    if with_sources:
        pred = ad.read_h5ad(folder / "m.h5ad")
        pred.obs["control_index"] = np.concatenate([sources, np.arange(controls.matrix.shape[0])])
        pred.write_h5ad(folder / "m.h5ad")
    return folder / "m.h5ad", predicted, sources


def test_predicted_cells_take_left_out_genes_from_their_source_control_cell(files, counts_run, tmp_path) -> None:
    out, _ = counts_run
    pred_path, predicted, sources = _modelled_prediction(out, tmp_path, with_sources=True)
    fill = GeneFill.from_files(out / "genes.tsv", out / "processed.h5ad", files.scperturb)
    full = expand_prediction_files(pred_path, fill, tmp_path / "pred.h5ad", tmp_path / "pred_means.csv", seed=1)
    written = ad.read_h5ad(tmp_path / "pred.h5ad")
    assert list(written.var_names) == files.genes
    status = written.var["gene_status"].to_numpy()
    cells = written.X.toarray()
    labels = written.obs["target_gene"].astype(str).to_numpy()
    raw = _normalised_raw(files.scperturb)
    controls_raw = raw[fill.control_rows]
    np.testing.assert_allclose(cells[labels != CONTROL][:, status == "modelled"], predicted["CDKN1A+CEBPA"], rtol=1e-6)
    np.testing.assert_allclose(
        cells[labels != CONTROL][:, status == "not_selected"],
        controls_raw[sources][:, status == "not_selected"],
        rtol=1e-6,
    )
    assert not cells[:, status == "never_expressed"].any()
    np.testing.assert_allclose(cells[labels == CONTROL], controls_raw, rtol=1e-6, atol=1e-6)
    means = pd.read_csv(tmp_path / "pred_means.csv", index_col=0)
    assert list(means.columns) == files.genes and list(means.index) == ["CDKN1A+CEBPA"]
    np.testing.assert_allclose(means.to_numpy()[0], cells[labels != CONTROL].mean(axis=0), rtol=1e-5)
    assert full.uns["ccfm_genes"]["not_selected"] == int((status == "not_selected").sum())


def test_without_recorded_sources_the_draw_is_ccfms_generation_draw(files, counts_run, tmp_path) -> None:
    from ccfm.model.generation import label_seed

    n_controls = 240
    for label in ("CDKN1A+CEBPA", "JUN"):
        generation_draw = np.random.default_rng(label_seed(42, label)).choice(
            np.arange(n_controls), size=32, replace=n_controls < 32
        )
        np.testing.assert_array_equal(drawn_sources(label, 32, n_controls, 42), generation_draw)
    out, _ = counts_run
    pred_path, _, _ = _modelled_prediction(out, tmp_path, with_sources=False)
    fill = GeneFill.from_files(out / "genes.tsv", out / "processed.h5ad", files.scperturb)
    expand_prediction_files(pred_path, fill, tmp_path / "pred.h5ad", tmp_path / "pred_means.csv", seed=42)
    written = ad.read_h5ad(tmp_path / "pred.h5ad")
    status = written.var["gene_status"].to_numpy()
    draw = drawn_sources("CDKN1A+CEBPA", 5, n_controls, 42)
    expected = _normalised_raw(files.scperturb)[fill.control_rows][draw][:, status == "not_selected"]
    np.testing.assert_allclose(written.X.toarray()[:5][:, status == "not_selected"], expected, rtol=1e-6)


def test_a_failed_prediction_leaves_no_output_and_no_temporary(files, counts_run, tmp_path) -> None:
    out, _ = counts_run
    with pytest.raises(RuntimeError, match="generation failed"):
        with predictions_on_all_genes(
            tmp_path / "pred.h5ad",
            tmp_path / "pred_means.csv",
            genes_tsv=out / "genes.tsv",
            processed_h5ad=out / "processed.h5ad",
            raw_h5ad=files.scperturb,
            seed=1,
        ) as (pred, means):
            pred.write_bytes(b"half")
            raise RuntimeError("generation failed")
    assert list(tmp_path.iterdir()) == []
