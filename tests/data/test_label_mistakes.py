"""Label mistakes in a user's own file stop (or are matched) before training (issue 21)."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest

from ccfm.data.conditions import match_label_case
from ccfm.data.preprocess import PreprocessSettings, preprocess_dataset
from ccfm.data.validation import ComboSeparatorError, LabelParseError
from public_files import write_public_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_public_files(tmp_path_factory.mktemp("public"))


def _relabelled(source: Path, out: Path, column: str, relabel) -> Path:
    adata = ad.read_h5ad(source)
    adata.obs[column] = adata.obs[column].astype(str).map(relabel)
    adata.write_h5ad(out)
    return out


def test_doubles_joined_by_another_character_stop_naming_combo_separator(files, tmp_path: Path) -> None:
    # the scPerturb file's A_B doubles, with the default combo_separator "+"
    with pytest.raises(ComboSeparatorError) as info:
        preprocess_dataset(
            files.scperturb,
            tmp_path / "out" / "processed.h5ad",
            PreprocessSettings(dataset="x", perturbation_column="perturbation", control_label="control"),
            genes_tsv=tmp_path / "out" / "genes.tsv",
        )
    message = str(info.value)
    assert isinstance(info.value, LabelParseError)
    assert 'combo_separator: "_"' in message and "combo_separator is '+'" in message
    assert "10 of the 16 perturbed names" in message and "CEBPA_JUN" in message
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    # written with the right separator the same file preprocesses
    summary = preprocess_dataset(
        files.scperturb,
        tmp_path / "ok.h5ad",
        PreprocessSettings(
            dataset="x", perturbation_column="perturbation", control_label="control", combo_separator="_"
        ),
    )
    assert summary["conditions"] == {"control": 1, "single": 8, "double": 10}


def test_a_few_genes_with_a_dash_are_not_taken_for_doubles(files, tmp_path: Path) -> None:
    # one odd name among many unmeasured genes does not stop the run
    path = _relabelled(files.gears, tmp_path / "raw.h5ad", "condition", lambda v: v.replace("ZBTB10", "CEBPA-ETS1"))
    preprocess_dataset(
        path,
        tmp_path / "p.h5ad",
        PreprocessSettings(dataset="x", perturbation_column="condition", control_label="ctrl"),
    )


def test_labels_in_another_letter_case_match_their_gene_and_are_reported(files, tmp_path: Path, caplog) -> None:
    measured = files.measured_perturbed[0]  # a perturbed gene with a column, e.g. CDKN1A
    unmeasured = files.unmeasured_perturbed[0]  # no column: its spellings among the labels are unified

    def relabel(value: str) -> str:
        value = value.replace(measured, measured.lower())
        return value.replace(f"{unmeasured}+ctrl", f"{unmeasured.lower()}+ctrl")  # its single only

    path = _relabelled(files.gears, tmp_path / "raw.h5ad", "condition", relabel)
    with caplog.at_level(logging.WARNING, logger="ccfm.data.preprocess"):
        summary = preprocess_dataset(
            path,
            tmp_path / "processed.h5ad",
            PreprocessSettings(dataset="x", perturbation_column="condition", control_label="ctrl"),
            perturbed_genes_tsv=tmp_path / "perturbed_genes.tsv",
        )
    assert summary["case_matched"] == {measured.lower(): measured, unmeasured.lower(): unmeasured}
    processed = ad.read_h5ad(tmp_path / "processed.h5ad")
    labels = set(processed.obs["target_gene"].astype(str))
    assert measured in labels and measured.lower() not in labels and unmeasured in labels
    assert not any(name.lower() == name and name != "non-targeting" for name in labels)
    assert summary["perturbed_status"]["measured"] == 2  # the link to the expression column is kept
    assert summary["conditions"] == {"control": 1, "single": 8, "double": 10}
    table = pd.read_csv(tmp_path / "perturbed_genes.tsv", sep="\t").set_index("status")
    assert table.loc["case_matched", "n_genes"] == 2
    assert f"{measured.lower()} -> {measured}" in table.loc["case_matched", "genes"]
    assert "another letter case" in caplog.text


def test_match_label_case_unit() -> None:
    labels = pd.Series(["gata1", "GATA1+klf1", "Klf1", "KLF1", "KLF1", "non-targeting", "spi1+Spi1"])
    renamed, matched = match_label_case(labels, ["GATA1", "ACTB"])
    assert matched == {"gata1": "GATA1", "Klf1": "KLF1", "klf1": "KLF1", "spi1": "Spi1"}  # tie: first in sorted order
    assert list(renamed) == ["GATA1", "GATA1+KLF1", "KLF1", "KLF1", "KLF1", "non-targeting", "Spi1"]
    same, none = match_label_case(pd.Series(["GATA1", "A+B"]), ["GATA1"])
    assert none == {} and list(same) == ["GATA1", "A+B"]
