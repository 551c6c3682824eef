"""Input validation: fail early, at the first rule that reads a file, with an actionable message.

Every check raises a subclass of :class:`InputValidationError` whose message names the file,
the problem and the fix, so a user running the pipeline for days on a cluster learns what is
wrong in the first minutes and how to repair the input or the config. The checks are cheap:
metadata checks read ``obs``/``var`` only, value checks run on the row chunks the streaming
passes read anyway (:func:`check_chunk_values`), never on a whole matrix.

Used by :mod:`ccfm.preprocess` (rules ``preprocess`` and ``preprocess_target``);
:func:`validate_predict_entries` is also meant for the model stage, which knows the scGPT vocab.
"""

from __future__ import annotations

import difflib
import logging
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ccfm.conditions import CONTROL, CONTROL_TOKENS, condition_type, split_double

log = logging.getLogger(__name__)

# Ensembl gene ids (human ENSG, mouse ENSMUSG, ...), optionally versioned (ENSG00000141510.17).
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
# var columns that conventionally hold gene symbols, in order of preference.
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "gene_name", "gene_names", "feature_name", "symbol", "symbols", "gene")
# Substrings that betray a control label spelled in a way the parser does not know.
_CONTROL_HINTS = ("ctrl", "control", "non-target", "nontarget", "non_target", "ntc", "safe", "scrambl", "neg")
_ENSEMBL_FRACTION = 0.5
_SHOW = 10


class InputValidationError(ValueError):
    """An input file or a config entry is unusable; the message names file, problem and fix."""


class MissingColumnError(InputValidationError, KeyError):
    """The configured perturbation column is not in ``obs``."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingLabelError(InputValidationError):
    """Some cells have no perturbation label."""


class NoControlCellsError(InputValidationError):
    """No cell carries the control label (and no near match was found)."""


class ControlLabelMismatchError(NoControlCellsError):
    """No cell carries the configured control label, but a similar label exists."""


class InvalidValuesError(InputValidationError):
    """The expression matrix holds negative, NaN or infinite values."""


class DuplicateGenesError(InputValidationError):
    """``var_names`` contains duplicated gene names."""


class EnsemblIdsError(InputValidationError):
    """``var_names`` are Ensembl ids where gene symbols are needed."""


class UnknownPerturbationError(InputValidationError):
    """A ``predict:`` entry names a gene absent from the data (or from the scGPT vocabulary)."""


class UnreadableInputError(InputValidationError):
    """The input file is missing, empty, truncated or not an HDF5/h5ad file."""


def check_readable_h5ad(path: Path) -> None:
    """Raise :class:`UnreadableInputError` unless ``path`` is an HDF5 file holding obs, var and X."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise UnreadableInputError(f"{path}: the input file does not exist. Fix: check the dataset's 'path:' in config/config.yaml.")
    problem = None
    if path.stat().st_size == 0:
        problem = "the file is empty"
    elif not h5py.is_hdf5(path):
        problem = "the file is not an HDF5/h5ad file (truncated download, or another format such as .loom/.csv/.rds?)"
    else:
        try:
            with h5py.File(path, "r") as file:
                missing = [key for key in ("obs", "var", "X") if key not in file]
        except OSError as error:  # a truncated HDF5 file often opens but fails here
            missing, problem = [], f"HDF5 cannot read it ({error}): truncated or corrupted"
        if missing:
            problem = f"the HDF5 file has no {', '.join(missing)}: it is not an AnnData .h5ad file"
    if problem:
        raise UnreadableInputError(
            f"{path}: {problem}. Fix: delete it and download/export it again (AnnData: adata.write_h5ad)."
        )


def _preview(items: Sequence[str], n: int = _SHOW) -> str:
    shown = ", ".join(map(str, items[:n]))
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


# --------------------------------------------------------------------------------------------
# obs: perturbation column and control cells
# --------------------------------------------------------------------------------------------


def check_perturbation_column(obs: pd.DataFrame, column: str, path: Path) -> None:
    """Raise :class:`MissingColumnError` (listing the available columns) if ``column`` is absent."""
    if column in obs.columns:
        return
    candidates = difflib.get_close_matches(column, [str(c) for c in obs.columns], n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in candidates)}?" if candidates else ""
    raise MissingColumnError(
        f"{path}: obs has no perturbation column {column!r}; available obs columns: "
        f"{list(map(str, obs.columns))}.{hint} Fix: set 'perturbation_column' for this dataset "
        f"in config/config.yaml to the column that holds the perturbation labels."
    )


def check_labels_present(labels: pd.Series, column: str, control_label: str, path: Path) -> None:
    """Raise :class:`MissingLabelError` if any cell has an empty/NaN label."""
    text = labels.astype(str).str.strip()
    empty = labels.isna() | text.eq("") | text.str.lower().isin({"nan", "none"})
    if empty.any():
        raise MissingLabelError(
            f"{path}: {int(empty.sum())} cells have no label in obs[{column!r}] (e.g. cells "
            f"{_preview(list(map(str, labels.index[empty.to_numpy()][:5])))}). Fix: drop these "
            f"unassigned cells from the file, or label them (controls as {control_label!r})."
        )


def near_control_labels(labels: Iterable[str], control_label: str) -> list[str]:
    """Distinct labels that look like a misspelled control label, best first."""
    distinct = sorted({str(v) for v in labels})
    wanted = {control_label.lower(), *CONTROL_TOKENS}
    scored: dict[str, float] = {}
    for label in distinct:
        low = label.lower()
        ratio = max(difflib.SequenceMatcher(None, low, w).ratio() for w in wanted)
        if ratio >= 0.75 or any(hint in low for hint in _CONTROL_HINTS):
            scored[label] = ratio
    return sorted(scored, key=lambda k: (-scored[k], k))


def check_controls(
    labels: pd.Series, condition_types: pd.Series, column: str, control_label: str, path: Path
) -> None:
    """Raise if no cell is a control; suggest a near-matching label when there is one."""
    if (condition_types.astype(str) == "control").any():
        return
    near = near_control_labels(labels.astype(str).unique(), control_label)
    if near:
        raise ControlLabelMismatchError(
            f"{path}: no cell has the control label {control_label!r} in obs[{column!r}], but "
            f"similar labels exist: {_preview(near, 5)}. Fix: set 'control_label: {near[0]}' for "
            f"this dataset in config/config.yaml (or relabel the control cells)."
        )
    raise NoControlCellsError(
        f"{path}: no control cells: no label in obs[{column!r}] equals the control label "
        f"{control_label!r} (labels seen: {_preview(sorted(labels.astype(str).unique()), 8)}). "
        f"Every perturbation effect is measured against control cells. Fix: set "
        f"'control_label' in config/config.yaml to the label of the unperturbed cells, or use a "
        f"file that contains control cells."
    )


def doubles_missing_singles(conditions: Iterable[str]) -> list[str]:
    """Canonical doubles ``A+B`` for which ``A`` or ``B`` has no single-perturbation cells."""
    distinct = {str(c) for c in conditions} - {CONTROL}
    singles = {c for c in distinct if condition_type(c) == "single"}
    return sorted(d for d in distinct if condition_type(d) == "double" and not set(split_double(d)) <= singles)


def warn_doubles_missing_singles(conditions: Iterable[str], path: Path | str, logger: logging.Logger = log) -> list[str]:
    """Log (warning) doubles whose singles are missing: their additive baseline is impossible."""
    incomplete = doubles_missing_singles(conditions)
    if incomplete:
        logger.warning(
            "%s: %d double perturbation(s) lack cells for one or both singles, so the additive "
            "baseline (control + delta A + delta B) cannot be computed for them; they are still "
            "trained/predicted by CCFM, and listed as 'doubles_missing_singles' in the split JSON: %s",
            path, len(incomplete), _preview(incomplete, 20),
        )
    return incomplete


# --------------------------------------------------------------------------------------------
# var: gene names
# --------------------------------------------------------------------------------------------


def is_ensembl_id(name: str) -> bool:
    """Whether ``name`` is an Ensembl gene id (``ENSG00000141510``, versioned or not)."""
    return bool(_ENSEMBL.match(str(name)))


def symbol_column(var: pd.DataFrame) -> str | None:
    """A var column that holds gene symbols (mostly non-Ensembl strings), if any."""
    ordered = [c for c in SYMBOL_COLUMNS if c in var.columns]
    ordered += [c for c in var.columns if c not in ordered and any(h in str(c).lower() for h in ("symbol", "name"))]
    for column in ordered:
        values = var[column]
        if not (pd.api.types.is_object_dtype(values) or isinstance(values.dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(values)):
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
                f"{path}: {fraction:.0%} of var_names are Ensembl ids (e.g. {_preview(list(names[:3]))}), "
                f"but perturbation labels and the scGPT vocabulary use gene symbols. Fix: {fix}."
            )
    if names.has_duplicates and not allow_duplicates:
        counts = names.value_counts()
        dups = counts[counts > 1]
        raise DuplicateGenesError(
            f"{path}: {dups.size} gene names occur more than once in var_names "
            f"({_preview([f'{g} x{n}' for g, n in dups.items()])}). Fix: make them unique "
            f"(adata.var_names_make_unique()) or sum the duplicated columns, then write the file again."
        )


# --------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------


def check_chunk_values(chunk: sp.spmatrix | np.ndarray, path: Path, start: int, layer: str | None = None) -> None:
    """Raise :class:`InvalidValuesError` if a row chunk has NaN, inf or negative values.

    ``start`` is the file row of the chunk's first row, so the message names the cell row.
    Only the stored values are scanned (the sparse ``data`` array): cost O(nnz of the chunk).
    """
    values = chunk.data if sp.issparse(chunk) else np.asarray(chunk)
    where = f"{path} ({'X' if layer is None else 'layers/' + layer})"
    if values.size == 0:
        return
    finite = np.isfinite(values)
    if not finite.all():
        rows = _bad_rows(chunk, ~finite)
        raise InvalidValuesError(
            f"{where}: {int((~finite).sum())} NaN/infinite values in rows {start + rows[0]}..{start + rows[-1]} "
            f"(e.g. row {start + rows[0]}). Expression values must be finite. Fix: remove or repair "
            f"these cells (adata.X.data[~np.isfinite(adata.X.data)] = 0 if they are missing counts) "
            f"and write the file again."
        )
    negative = values < 0
    if negative.any():
        rows = _bad_rows(chunk, negative)
        raise InvalidValuesError(
            f"{where}: {int(negative.sum())} negative values (min {float(values.min()):.3g}) in rows "
            f"{start + rows[0]}..{start + rows[-1]}: the data look scaled/z-scored or batch-corrected. "
            f"Fix: provide raw counts (preferred) or log1p-normalised values, e.g. from "
            f"adata.layers['counts'] or adata.raw."
        )


def _bad_rows(chunk: sp.spmatrix | np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sorted row indices (within the chunk) of the flagged stored values."""
    if sp.issparse(chunk):
        csr = sp.csr_matrix(chunk)
        row_of_value = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
        return np.unique(row_of_value[mask])
    return np.unique(np.nonzero(np.atleast_2d(mask))[0])


# --------------------------------------------------------------------------------------------
# predict: entries
# --------------------------------------------------------------------------------------------


def predict_entry_genes(entry: str) -> list[str]:
    """Gene names of a ``predict:`` entry (``A`` or ``A+B``; control tokens are ignored)."""
    return [t.strip() for t in str(entry).split("+") if t.strip() and t.strip().lower() not in CONTROL_TOKENS | {CONTROL}]


def validate_predict_entries(
    entries: Iterable[str],
    genes: Iterable[str],
    vocab: Mapping[str, int] | Iterable[str] | None = None,
    *,
    perturbed: Iterable[str] = (),
    where: str = "config 'predict:'",
) -> list[str]:
    """Check every ``predict:`` entry names genes the model can embed.

    A gene is embeddable when it is measured (in ``genes``; then also in ``vocab`` when one is
    given) or, unmeasured, perturbed in the data's cells (``perturbed``: it gets a learned
    perturbation row of its own). A gene that is neither has no expression and no training
    cell, so nothing can be said about it. Returns the distinct genes named. Raises
    :class:`UnknownPerturbationError` listing every offending entry with close matches
    (case-insensitive first) as suggestions. Entries must have one or two genes.
    """
    gene_set = {str(g) for g in genes}
    perturbed_set = {str(g) for g in perturbed} - gene_set
    known = sorted(gene_set | perturbed_set)
    vocab_set = None if vocab is None else {str(g) for g in vocab}
    by_lower: dict[str, str] = {g.lower(): g for g in known}
    problems: list[str] = []
    named: list[str] = []
    for entry in entries:
        names = predict_entry_genes(entry)
        if not 1 <= len(names) <= 2:
            problems.append(f"{entry!r} names {len(names)} genes (expected 'A' or 'A+B')")
            continue
        for name in names:
            if name not in named:
                named.append(name)
            if name in perturbed_set:
                continue  # unmeasured but perturbed in the data: embedded by its own learned row
            if name not in gene_set:
                suggestion = by_lower.get(name.lower()) or next(iter(difflib.get_close_matches(name, known, n=1, cutoff=0.8)), None)
                hint = f" (did you mean {suggestion!r}?)" if suggestion else ""
                problems.append(
                    f"{entry!r}: gene {name!r} is not in the data{hint}: it is not measured (absent from var) and "
                    f"no cell perturbs it, so there is neither expression nor a training cell to learn its effect from"
                )
            elif vocab_set is not None and name not in vocab_set:
                problems.append(f"{entry!r}: gene {name!r} is not in the scGPT vocabulary (no gene embedding)")
    if problems:
        raise UnknownPerturbationError(
            f"{where}: {len(problems)} problem(s): " + "; ".join(problems)
            + ". Fix: correct the gene symbols in the dataset's 'predict:' list in config/config.yaml "
            "or remove these entries (a gene outside the measured panel can be predicted only when "
            "cells perturbing it are in the data; pretrained scGPT gene embeddings are not used as a "
            "prior for such genes)."
        )
    return named
