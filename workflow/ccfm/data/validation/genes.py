"""Checks of ``var``: gene symbols rather than Ensembl ids, no duplicated names, and enough genes shared
by a target context with its source."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ccfm.data.validation.errors import (
    DuplicateGenesError,
    EnsemblIdsError,
    TargetGenesError,
    preview,
)

log = logging.getLogger(__name__)


# Ensembl gene ids (human ENSG, mouse ENSMUSG, ...), optionally versioned (ENSG00000141510.17);
# any case: some exports lower-case them (ensg00000141510), and they are still ids, not symbols.
ENSEMBL_PATTERN = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$", re.IGNORECASE)


# var columns that conventionally hold gene symbols, in order of preference (scanpy, CellxGene, 10x).
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "gene_name", "gene_names", "feature_name", "symbol", "symbols", "gene")


# var columns that conventionally hold Ensembl ids.
ENSEMBL_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_ids", "ensembl", "feature_id")


_ENSEMBL_FRACTION = 0.5


def is_ensembl_id(name: str) -> bool:
    """Whether ``name`` is an Ensembl gene id (``ENSG00000141510``, versioned or not)."""
    return bool(ENSEMBL_PATTERN.match(str(name)))


def symbol_column(var: pd.DataFrame) -> str | None:
    """A var column that holds gene symbols (mostly non-Ensembl strings), if any."""
    ordered = [c for c in SYMBOL_COLUMNS if c in var.columns]
    ordered += [c for c in var.columns if c not in ordered and any(h in str(c).lower() for h in ("symbol", "name"))]
    for column in ordered:
        values = var[column]
        if not (
            pd.api.types.is_object_dtype(values)
            or isinstance(values.dtype, pd.CategoricalDtype)
            or pd.api.types.is_string_dtype(values)
        ):
            continue
        text = values.astype(str)
        if len(text) and np.mean([not is_ensembl_id(v) and v not in ("", "nan") for v in text]) > 0.5:
            return str(column)
    return None


def check_gene_names(var: pd.DataFrame, path: Path, *, allow_duplicates: bool = False) -> None:
    """Raise for Ensembl-id ``var_names`` and for duplicated names (unless ``allow_duplicates``)."""
    names = pd.Index(var.index.astype(str))
    if len(names):
        fraction = float(np.mean([is_ensembl_id(n) for n in names]))
        if fraction >= _ENSEMBL_FRACTION:
            column = symbol_column(var)
            fix = (
                f"var[{column!r}] holds gene symbols: make them the index, e.g. "
                f"adata.var_names = adata.var[{column!r}].astype(str); adata.var_names_make_unique(); "
                f"then write the file again"
                if column
                else "map the ids to HGNC symbols (e.g. with a BioMart table) and store the symbols as var_names"
            )
            raise EnsemblIdsError(
                f"{path}: {fraction:.0%} of var_names are Ensembl ids (e.g. {preview(list(names[:3]))}), "
                f"but perturbation labels and the scGPT vocabulary use gene symbols. Fix: {fix}."
            )
    if names.has_duplicates and not allow_duplicates:
        counts = names.value_counts()
        dups = counts[counts > 1]
        raise DuplicateGenesError(
            f"{path}: {dups.size} gene names occur more than once in var_names "
            f"({preview([f'{g} x{n}' for g, n in dups.items()])}). Fix: make them unique "
            f"(adata.var_names_make_unique()) or sum the duplicated columns, then write the file again."
        )


def check_target_gene_overlap(
    genes: Sequence[str], target_genes: Iterable[str], target_path: Path, processed_path: Path, min_fraction: float
) -> None:
    """Raise :class:`TargetGenesError` if fewer than ``min_fraction`` of ``genes`` are in the target.

    Missing genes become all-zero target columns: with most of them missing, the learned shift
    and the adapted predictions are meaningless rather than merely worse.
    """
    genes = [str(g) for g in genes]
    present = {str(g) for g in target_genes}
    shared = sum(g in present for g in genes)
    fraction = shared / max(len(genes), 1)
    if fraction >= min_fraction:
        return
    lower = {g.lower() for g in present}
    shared_any_case = sum(g.lower() in lower for g in genes)
    hints = []
    if shared_any_case > shared:
        hints.append(
            f"{shared_any_case} match when case is ignored "
            "(another species' symbols, e.g. mouse 'Gapdh' vs human 'GAPDH'?)"
        )
    if present and np.mean([is_ensembl_id(g) for g in list(present)[:1000]]) >= _ENSEMBL_FRACTION:
        hints.append("the target's var_names look like Ensembl ids: store gene symbols as var_names")
    hint = f" Hints: {'; '.join(hints)}." if hints else ""
    missing = [g for g in genes if g not in present]
    raise TargetGenesError(
        f"{target_path}: the target context shares only {shared} of the {len(genes)} genes of "
        f"{processed_path} ({fraction:.0%}, below the minimum {min_fraction:.0%}); missing e.g. "
        f"{preview(missing, 5)}. Missing genes would be all-zero columns and make the adaptation "
        f"meaningless.{hint} Fix: use a target file measured and named like the source (gene "
        f"symbols, same species), or lower 'min_shared_genes' in the dataset's 'target:' block of "
        f"config/config.yaml if this overlap is expected."
    )
