"""Gene -> scGPT vocab mapping and the gene_vocab.tsv contract."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from ccfm.scgpt.checkpoint import census_vocab_with_specials
from ccfm.scgpt.vocab import (
    check_gene_order,
    coverage_summary,
    coverage_table,
    map_genes,
    read_gene_vocab,
    vocab_id_array,
    write_gene_vocab,
)


@pytest.fixture(scope="module")
def vocab() -> dict[str, int]:
    return census_vocab_with_specials()


def test_exact_case_insensitive_and_none(vocab):
    table = map_genes(["GAPDH", "gapdh", "Actb", "NOT_A_GENE_XYZ", "<cls>"], vocab)
    assert list(table["match"]) == ["exact", "case_insensitive", "case_insensitive", "none", "none"]
    assert table["vocab_id"].iloc[0] == vocab["GAPDH"] == table["vocab_id"].iloc[1]
    assert table["vocab_id"].iloc[2] == vocab["ACTB"]
    assert table["vocab_id"].isna().tolist() == [False, False, False, True, True]  # special tokens never match
    assert str(table["vocab_id"].dtype) == "Int64"


def test_ensembl_ids_map_through_the_var_symbol_column(vocab):
    # the census vocabulary keys ~700 unnamed genes by Ensembl id, mostly with a version suffix;
    # ENSG00000283886 is one it holds without a version (and as .3)
    ensembl_key = "ENSG00000283886"
    assert ensembl_key in vocab and f"{ensembl_key}.7" not in vocab
    genes = ["ENSG00000111640.15", "ENSG00000075624", f"{ensembl_key}.7", "ENSG00000000000"]
    var = pd.DataFrame({"gene_symbols": ["GAPDH", "actb", "", "NOPE"]}, index=genes)
    table = map_genes(genes, vocab, var)
    assert list(table["match"]) == ["ensembl", "ensembl", "ensembl", "none"]
    assert table["vocab_id"].tolist()[:3] == [vocab["GAPDH"], vocab["ACTB"], vocab[ensembl_key]]
    with pytest.raises(ValueError, match="rows"):
        map_genes(genes, vocab, var.iloc[:2])


def test_tsv_round_trip_keeps_empty_ids_and_gene_names_like_NA(tmp_path, vocab):
    table = map_genes(["NA", "GAPDH", "unknown_1"], vocab)
    path = tmp_path / "gene_vocab.tsv"
    write_gene_vocab(table, path)
    lines = path.read_text().splitlines()
    assert lines[0] == "gene\tvocab_id\tmatch"
    assert lines[3] == "unknown_1\t\tnone"
    back = read_gene_vocab(path)
    assert list(back["gene"]) == ["NA", "GAPDH", "unknown_1"]
    assert vocab_id_array(back).tolist() == [-1, vocab["GAPDH"], -1]
    check_gene_order(back, ["NA", "GAPDH", "unknown_1"], "test")
    with pytest.raises(ValueError, match="rerun the gene_vocab_map"):
        check_gene_order(back, ["GAPDH", "NA", "unknown_1"], "test")


def test_real_datlinger_symbols_coverage(datlinger_h5ad, vocab):
    adata = ad.read_h5ad(datlinger_h5ad, backed="r")
    table = map_genes(adata.var_names, vocab, adata.var)
    adata.file.close()
    summary = coverage_table(table, "datlinger").iloc[0]
    # 1752 of the 2000 genes are in the census vocabulary, all by exact symbol: counted here by plain
    # membership of the file's var_names in the vocabulary of the scgpt wheel (the rest are unnamed
    # Ensembl ids of the dataset absent from the vocabulary and new lncRNA symbols).
    in_vocab = sum(str(name) in vocab for name in adata.var_names)
    assert (len(adata.var_names), in_vocab) == (2000, 1752)
    assert (summary["genes"], summary["mapped"], summary["exact"]) == (2000, in_vocab, in_vocab)
    assert "1752/2000 genes (87.6%)" in coverage_summary(table)
    mapped = table.dropna(subset=["vocab_id"])
    assert all(vocab[g] == i for g, i in zip(mapped["gene"], mapped["vocab_id"]))
    assert np.unique(mapped["vocab_id"]).size == len(mapped)
