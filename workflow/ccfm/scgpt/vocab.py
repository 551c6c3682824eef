"""Map a dataset's genes to scGPT vocabulary ids and read/write ``results/{ds}/gene_vocab.tsv``.

Order of attempts per gene: the symbol exactly as given; then case-insensitively (the census
vocabulary has no two symbols differing only in case, so this is unambiguous); then through the
dataset's own ``var`` annotation — a symbol column when ``var_names`` are Ensembl ids, or an
Ensembl id column / an Ensembl-looking name (the vocabulary keys some genes by Ensembl id).
Genes that match nothing get no id: they receive zero features downstream.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ccfm.data.validation import ENSEMBL_COLUMNS, SYMBOL_COLUMNS, is_ensembl_id
from ccfm.io.atomic import write_table_atomic

log = logging.getLogger(__name__)

MATCH_KINDS = ("exact", "case_insensitive", "ensembl", "none")
TSV_COLUMNS = ("gene", "vocab_id", "match")


def _strip_version(identifier: str) -> str:
    """ENSG00000141510.17 -> ENSG00000141510 (vocabulary keys carry no version)."""
    return identifier.split(".", 1)[0] if is_ensembl_id(identifier) else identifier


def _alternative_ids(var: pd.DataFrame | None, n_genes: int) -> list[list[str]]:
    """Per gene, identifiers from the dataset's var columns (symbols first, then Ensembl ids)."""
    alternatives: list[list[str]] = [[] for _ in range(n_genes)]
    if var is None:
        return alternatives
    if len(var) != n_genes:
        raise ValueError(f"var has {len(var)} rows but {n_genes} genes were given: pass the var of the same AnnData")
    lowered = {str(c).lower(): c for c in var.columns}
    for wanted in SYMBOL_COLUMNS + ENSEMBL_COLUMNS:
        column = lowered.get(wanted)
        if column is None:
            continue
        for i, value in enumerate(var[column].astype("string").fillna("").tolist()):
            if value:
                alternatives[i].append(str(value))
    return alternatives


def map_genes(genes: Sequence[str], vocab: Mapping[str, int], var: pd.DataFrame | None = None) -> pd.DataFrame:
    """Map ``genes`` to ``vocab`` ids.

    Returns a DataFrame with columns ``gene`` (as given, same order), ``vocab_id`` (nullable
    ``Int64``; missing when unmapped) and ``match`` (one of :data:`MATCH_KINDS`). Special tokens
    (``<pad>``, ``<cls>``, ...) are never matched.
    """
    gene_vocab = {k: v for k, v in vocab.items() if not (k.startswith("<") and k.endswith(">"))}
    by_lower = {k.lower(): v for k, v in gene_vocab.items()}
    alternatives = _alternative_ids(var, len(genes))
    ids: list[int | None] = []
    kinds: list[str] = []
    for gene, alts in zip(map(str, genes), alternatives):
        if gene in gene_vocab:
            ids.append(gene_vocab[gene])
            kinds.append("exact")
        elif gene.lower() in by_lower:
            ids.append(by_lower[gene.lower()])
            kinds.append("case_insensitive")
        else:
            found = None
            # the vocabulary keys some genes by Ensembl id, with or without a version suffix
            candidates = [gene, *alts]
            for candidate in candidates + [_strip_version(c) for c in candidates]:
                found = gene_vocab.get(candidate, by_lower.get(candidate.lower()))
                if found is not None:
                    break
            ids.append(found)
            kinds.append("ensembl" if found is not None else "none")
    return pd.DataFrame(
        {
            "gene": pd.Series(list(map(str, genes)), dtype="string"),
            "vocab_id": pd.array(ids, dtype="Int64"),
            "match": pd.Categorical(kinds, categories=list(MATCH_KINDS)),
        }
    )


def coverage_summary(mapping: pd.DataFrame) -> str:
    """One line: how many genes map, and how."""
    n = len(mapping)
    mapped = int(mapping["vocab_id"].notna().sum())
    counts = mapping["match"].value_counts()
    parts = ", ".join(f"{kind} {int(counts.get(kind, 0))}" for kind in MATCH_KINDS)
    percent = 100.0 * mapped / n if n else 0.0
    return f"scGPT vocabulary coverage: {mapped}/{n} genes ({percent:.1f}%) mapped [{parts}]"


def coverage_table(mapping: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """One-row table: dataset, genes, mapped, percent, and the count of each match kind."""
    n = len(mapping)
    mapped = int(mapping["vocab_id"].notna().sum())
    counts = mapping["match"].value_counts()
    row = {
        "dataset": dataset,
        "genes": n,
        "mapped": mapped,
        "percent_mapped": round(100.0 * mapped / n, 2) if n else 0.0,
    }
    row.update({kind: int(counts.get(kind, 0)) for kind in MATCH_KINDS})
    return pd.DataFrame([row])


def write_coverage_table(mapping: pd.DataFrame, path: str | Path, dataset: str) -> None:
    """Write :func:`coverage_table` as TSV, atomically."""
    write_table_atomic(coverage_table(mapping, dataset), path, sep="\t", index=False)


def write_gene_vocab(mapping: pd.DataFrame, path: str | Path) -> None:
    """Write the TSV contract (empty ``vocab_id`` cell when unmapped), atomically."""
    write_table_atomic(mapping.loc[:, list(TSV_COLUMNS)], path, sep="\t", index=False)


def read_gene_vocab(path: str | Path) -> pd.DataFrame:
    """Read ``gene_vocab.tsv`` back (gene names such as ``NA`` stay strings)."""
    table = pd.read_csv(path, sep="\t", dtype={"gene": "string", "match": "string"}, keep_default_na=False)
    if list(table.columns) != list(TSV_COLUMNS):
        raise ValueError(
            f"{path} has columns {list(table.columns)}; expected {list(TSV_COLUMNS)} (rerun gene_vocab_map)"
        )
    ids = table["vocab_id"].astype("string")
    table["vocab_id"] = pd.to_numeric(ids.mask(ids == "")).astype("Int64")
    bad = sorted(set(table["match"]) - set(MATCH_KINDS))
    if bad:
        raise ValueError(f"{path}: unknown match kind(s) {bad}")
    return table


def vocab_id_array(mapping: pd.DataFrame) -> np.ndarray:
    """Vocab ids as an int64 array with -1 for unmapped genes (the extractor's input)."""
    return mapping["vocab_id"].fillna(-1).to_numpy(dtype=np.int64)


def check_gene_order(mapping: pd.DataFrame, genes: Sequence[str], where: str) -> None:
    """The mapping must list exactly ``genes`` in the same order."""
    if list(mapping["gene"]) != list(map(str, genes)):
        raise ValueError(
            f"{where}: gene list differs from the dataset's var_names (order or content); "
            "rerun the gene_vocab_map rule for this dataset"
        )


def gene_vocab_to_files(
    processed_h5ad: str | Path, vocab_json: str | Path, out_tsv: str | Path, out_coverage: str | Path, dataset: str
) -> pd.DataFrame:
    """The ``gene_vocab_map`` rule: map the dataset's genes to scGPT ids; write the map and its coverage."""
    from ccfm.io.h5ad import read_var
    from ccfm.scgpt.checkpoint import read_vocab

    var = read_var(processed_h5ad)
    mapping = map_genes(var.index.astype(str), read_vocab(vocab_json), var)
    write_gene_vocab(mapping, out_tsv)
    write_coverage_table(mapping, out_coverage, dataset)
    log.info("%s: %s", dataset, coverage_summary(mapping))
    return mapping
