"""Input validation: fail early, at the first rule that reads a file, with an actionable message.

Every check raises a subclass of :class:`InputValidationError` whose message names the file,
the problem and the fix, so a user running the pipeline for days on a cluster learns what is
wrong in the first minutes and how to repair the input or the config. The checks are cheap:
metadata checks read ``obs``/``var`` only, value checks run on the row chunks the streaming
passes read anyway (:func:`check_chunk_values`), never on a whole matrix.

Used by :mod:`ccfm.data.preprocess` (rules ``preprocess`` and ``preprocess_target``);
:func:`validate_predict_entries` is also meant for the model stage, which knows the scGPT vocab.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ccfm import COMBO_SEPARATOR
from ccfm.data.conditions import CONTROL, CONTROL_TOKENS, condition_type, split_double

log = logging.getLogger(__name__)

# Ensembl gene ids (human ENSG, mouse ENSMUSG, ...), optionally versioned (ENSG00000141510.17);
# any case: some exports lower-case them (ensg00000141510), and they are still ids, not symbols.
ENSEMBL_PATTERN = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$", re.IGNORECASE)
# var columns that conventionally hold gene symbols, in order of preference (scanpy, CellxGene, 10x).
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "gene_name", "gene_names", "feature_name", "symbol", "symbols", "gene")
# var columns that conventionally hold Ensembl ids.
ENSEMBL_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_ids", "ensembl", "feature_id")
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


class EmptyInputError(InputValidationError):
    """The h5ad file is well-formed but holds no cells (or no genes)."""


class UnsupportedDtypeError(InputValidationError):
    """The expression matrix is stored in a dtype the streaming readers cannot use (float16, strings)."""


class DuplicateCellsError(InputValidationError):
    """``obs_names`` contains duplicated cell names."""


class NotGeneSymbolsError(InputValidationError):
    """The perturbation column of a gene dataset holds numbers, not gene symbols."""


class LabelParseError(InputValidationError):
    """A perturbation label cannot be parsed (more than two perturbations, a stray guide index)."""


class TargetGenesError(InputValidationError):
    """The target context shares too few genes with the source dataset for adaptation to mean anything."""


class ComboSeparatorError(LabelParseError):
    """Doubles written with another separator than ``combo_separator`` were read as single genes."""


class BatchSizeError(InputValidationError):
    """``train.batch_size`` is beyond the cells a training batch can draw without repeating them all."""


# Perturbations with fewer cells than this get a warning: their metrics are mostly noise.
FEW_CELLS = 3


def _supported_dtype(dtype: np.dtype) -> bool:
    """Whether scipy.sparse and the streaming readers handle ``dtype`` (float16 is not handled)."""
    return dtype.kind in "iub" or dtype in (np.dtype(np.float32), np.dtype(np.float64))


def check_readable_h5ad(path: Path) -> None:
    """Raise :class:`UnreadableInputError` unless ``path`` is an HDF5 file holding obs, var and X."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise UnreadableInputError(
            f"{path}: the input file does not exist. Fix: check the dataset's 'path:' in config/config.yaml."
        )
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
    check_not_empty(path)
    check_matrix_dtypes(path)


# The matrices preprocessing reads: X, and the raw counts layer when X is log1p.
_READ_ELEMENTS = ("X", "layers/counts")


def _matrix_elements(path: Path) -> dict[str, Any]:
    """The matrices preprocessing reads, as ``name -> (shape, dtype)`` from the metadata."""
    import h5py

    found: dict[str, Any] = {}
    with h5py.File(path, "r") as file:
        for name in _READ_ELEMENTS:
            if name not in file:
                continue
            element = file[name]
            if isinstance(element, h5py.Dataset):
                found[name] = (tuple(int(n) for n in element.shape), element.dtype)
            elif "data" in element and "shape" in element.attrs:
                found[name] = (tuple(int(n) for n in element.attrs["shape"]), element["data"].dtype)
    return found


def check_not_empty(path: Path) -> None:
    """Raise :class:`EmptyInputError` if X has no cells or no genes (from the metadata only)."""
    shape, _ = _matrix_elements(Path(path)).get("X", ((1, 1), None))
    if len(shape) == 2 and 0 in shape:
        what = "no cells (0 rows)" if shape[0] == 0 else "no genes (0 columns)"
        raise EmptyInputError(
            f"{path}: the file is empty: X has shape {shape[0]} x {shape[1]}, {what}. The pipeline "
            f"needs the cells of the experiment. Fix: check that 'path:'/'url:' names the right file "
            f"in config/config.yaml, and that filtering before export did not drop every cell or gene."
        )


def check_matrix_dtypes(path: Path) -> None:
    """Raise :class:`UnsupportedDtypeError` if X or layers['counts'] is float16, complex or non-numeric.

    Other layers are never read, so their dtype does not matter.

    Checked from the metadata, before any row is read: scipy.sparse cannot hold float16, so the
    streaming passes would otherwise stop with a scipy trace at their first chunk.
    """
    for name, (_, dtype) in _matrix_elements(Path(path)).items():
        if _supported_dtype(np.dtype(dtype)):
            continue
        target = "adata.X" if name == "X" else f"adata.layers[{name.split('/', 1)[1]!r}]"
        raise UnsupportedDtypeError(
            f"{path}: {name} is stored as {np.dtype(dtype)}, which the pipeline cannot read "
            f"(scipy sparse matrices support float32/float64 and integer types, not float16). "
            f"Fix: convert and write the file again: {target} = {target}.astype('float32'); "
            f"adata.write_h5ad(...). float32 keeps every float16 value exactly."
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


def check_controls(labels: pd.Series, condition_types: pd.Series, column: str, control_label: str, path: Path) -> None:
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


def warn_doubles_missing_singles(
    conditions: Iterable[str], path: Path | str, logger: logging.Logger = log
) -> list[str]:
    """Log (warning) doubles whose singles are missing: their additive baseline is impossible."""
    incomplete = doubles_missing_singles(conditions)
    if incomplete:
        logger.warning(
            "%s: %d double perturbation(s) lack cells for one or both singles, so the additive "
            "baseline (control + delta A + delta B) cannot be computed for them; they are still "
            "trained/predicted by CCFM, and listed as 'doubles_missing_singles' in the split JSON: %s",
            path,
            len(incomplete),
            _preview(incomplete, 20),
        )
    return incomplete


# --------------------------------------------------------------------------------------------
# var: gene names
# --------------------------------------------------------------------------------------------


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


# Characters a double's two genes are commonly joined by in public files.
SEPARATOR_CANDIDATES = ("_", "+", "-", "|", ",", ";", "/", ":", ".", " ", "&")


def joined_gene_names(names: Iterable[str], known: Iterable[str], separator: str) -> dict[str, tuple[str, str]]:
    """Names that are two ``known`` genes joined by one of :data:`SEPARATOR_CANDIDATES` (not ``separator``).

    Matching ignores letter case. Returns ``{name: (character, separator found)}``.
    """
    lower = {str(g).lower() for g in known}
    found: dict[str, tuple[str, str]] = {}
    for name in names:
        for char in SEPARATOR_CANDIDATES:
            if char == separator or char not in name:
                continue
            parts = [p for p in name.split(char) if p]
            if len(parts) == 2 and all(p.lower() in lower for p in parts):
                found[name] = (char, char)
                break
    return found


def check_combo_separator(
    unmeasured: Sequence[str], perturbed: Iterable[str], genes: Iterable[str], separator: str, path: Path
) -> None:
    """Stop when most unmeasured perturbed names are two known genes joined by another character.

    ``unmeasured``: perturbed names without an expression column; known genes are the columns
    (``genes``) and the other perturbed names (``perturbed``): a double written ``CEBPA_GATA1``
    while the config says ``+`` is otherwise read as one gene nobody measured, and the run
    silently scores singles instead of doubles.
    """
    unmeasured = list(unmeasured)
    if not unmeasured:
        return
    joined = joined_gene_names(unmeasured, [*map(str, genes), *map(str, perturbed)], separator)
    if len(joined) * 2 <= len(unmeasured):
        return
    chars = pd.Series([char for char, _ in joined.values()]).value_counts()
    char = str(chars.index[0])
    examples = ", ".join(list(joined)[:_SHOW])
    raise ComboSeparatorError(
        f"{path}: {len(joined)} of the {len(unmeasured)} perturbed names without an expression column are "
        f"two gene names joined by {char!r} ({examples}): these look like doubles written with {char!r}, "
        f"but combo_separator is {separator!r}, so each would be read as one unmeasured gene. Fix: set "
        f"'combo_separator: \"{char}\"' for this dataset in config/config.yaml."
    )


def predict_entry_genes(entry: str) -> list[str]:
    """Gene names of a ``predict:`` entry (``A`` or ``A+B``; control tokens are ignored)."""
    return [
        t.strip()
        for t in str(entry).split(COMBO_SEPARATOR)
        if t.strip() and t.strip().lower() not in CONTROL_TOKENS | {CONTROL}
    ]


def _did_you_mean(name: str, known: Sequence[str], by_lower: Mapping[str, str]) -> str:
    """`` (did you mean 'X'?)`` for the case-insensitive or closest known name, else ``""``."""
    suggestion = by_lower.get(name.lower()) or next(iter(difflib.get_close_matches(name, known, n=1, cutoff=0.8)), None)
    return f" (did you mean {suggestion!r}?)" if suggestion else ""


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
                hint = _did_you_mean(name, known, by_lower)
                problems.append(
                    f"{entry!r}: gene {name!r} is not in the data{hint}: it is not measured (absent from var) and "
                    f"no cell perturbs it, so there is neither expression nor a training cell to learn its effect from"
                )
            elif vocab_set is not None and name not in vocab_set:
                problems.append(f"{entry!r}: gene {name!r} is not in the scGPT vocabulary (no gene embedding)")
    if problems:
        raise UnknownPerturbationError(
            f"{where}: {len(problems)} problem(s): "
            + "; ".join(problems)
            + ". Fix: correct the gene symbols in the dataset's 'predict:' list in config/config.yaml "
            "or remove these entries (a gene outside the measured panel can be predicted only when "
            "cells perturbing it are in the data; pretrained scGPT gene embeddings are not used as a "
            "prior for such genes)."
        )
    return named


def validate_drug_predict_entries(
    entries: Iterable[str], drugs: Iterable[str], *, where: str = "config 'predict:'"
) -> list[str]:
    """Check ``predict:`` entries of a ``perturbation_type: drug`` dataset against its drugs.

    Drugs are not genes: they are checked against the drug names the data's labels use (an
    unseen drug has no trained embedding, so its prediction would mean nothing). Returns the
    distinct drugs named; raises :class:`UnknownPerturbationError` with close matches.
    """
    known = {str(d) for d in drugs}
    by_lower = {d.lower(): d for d in sorted(known)}
    problems: list[str] = []
    named: list[str] = []
    for entry in entries:
        names = predict_entry_genes(entry)
        if not 1 <= len(names) <= 2:
            problems.append(f"{entry!r} names {len(names)} drugs (expected 'A' or 'A+B')")
            continue
        for name in names:
            if name not in named:
                named.append(name)
            if name not in known:
                hint = _did_you_mean(name, sorted(known), by_lower)
                problems.append(f"{entry!r}: drug {name!r} is not among the drugs of the data{hint}")
    if problems:
        raise UnknownPerturbationError(
            f"{where}: {len(problems)} problem(s): "
            + "; ".join(problems)
            + f". Drugs of the data: {_preview(sorted(known))}. Fix: correct the drug names in the "
            "dataset's 'predict:' list in config/config.yaml (as the perturbation column spells them) or "
            "remove these entries."
        )
    return named


# --------------------------------------------------------------------------------------------
# cells and labels
# --------------------------------------------------------------------------------------------

# A label that is a number: never a gene symbol (HGNC symbols never consist of digits only).
_NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?$")


def check_cell_names(obs: pd.DataFrame, path: Path) -> None:
    """Raise :class:`DuplicateCellsError` if ``obs_names`` has duplicates.

    Cells are told apart by name in real.h5ad, the predictions and cell-eval; concatenated
    samples often repeat barcodes.
    """
    names = pd.Index(obs.index.astype(str))
    if not names.has_duplicates:
        return
    counts = names.value_counts()
    dups = counts[counts > 1]
    raise DuplicateCellsError(
        f"{path}: {dups.size} cell names occur more than once in obs_names "
        f"({_preview([f'{c} x{n}' for c, n in dups.items()])}). Fix: make them unique "
        f"(adata.obs_names_make_unique(), or prefix the sample id when files were concatenated), "
        f"then write the file again."
    )


def check_gene_labels(
    labels: pd.Series, column: str, control_label: str, path: Path, obs_columns: Sequence[str]
) -> None:
    """Raise :class:`NotGeneSymbolsError` if a gene dataset's labels are numbers (an index column)."""
    text = pd.Series(pd.unique(labels.astype(str).str.strip()))
    controls = CONTROL_TOKENS | {CONTROL, control_label.strip().lower()}
    distinct = [label for label in text if label.lower() not in controls]
    numeric = [label for label in distinct if _NUMBER.match(label)]
    if numeric:
        raise NotGeneSymbolsError(
            f"{path}: obs[{column!r}] holds numbers "
            f"({_preview(sorted(numeric, key=lambda v: (len(v), v)))}; {len(numeric)} "
            f"of {len(distinct)} perturbation labels): the column is not gene symbols. With "
            f"'perturbation_type: gene' every label names the perturbed gene(s), e.g. 'KLF1' or "
            f"'KLF1+MAP2K6'. Fix: set 'perturbation_column' to the column that holds the target gene "
            f"symbols (obs columns: {list(map(str, obs_columns))}), or 'perturbation_type: drug' if "
            f"the numbers are compound ids."
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
        f"{_preview(missing, 5)}. Missing genes would be all-zero columns and make the adaptation "
        f"meaningless.{hint} Fix: use a target file measured and named like the source (gene "
        f"symbols, same species), or lower 'min_shared_genes' in the dataset's 'target:' block of "
        f"config/config.yaml if this overlap is expected."
    )


def few_cell_perturbations(cell_counts: Mapping[str, int], limit: int) -> dict[str, int]:
    """Perturbations (controls excluded) with fewer than ``limit`` cells, smallest first."""
    few = {str(k): int(v) for k, v in cell_counts.items() if str(k) != CONTROL and int(v) < limit}
    return dict(sorted(few.items(), key=lambda item: (item[1], item[0])))


def check_batch_size(
    cell_counts: Mapping[str, int],
    train_labels: Sequence[str],
    batch_size: int,
    where: str,
    logger: logging.Logger = log,
) -> None:
    """Bound ``train.batch_size`` by the cells a training step draws from.

    Each step draws ``batch_size`` cells of one training perturbation and as many controls,
    with replacement when a group is smaller. Beyond the largest training perturbation (or the
    controls) every batch repeats cells: a configuration error, not a choice. Smaller groups
    drawn with replacement are only logged.
    """
    sizes = {label: int(cell_counts.get(label, 0)) for label in train_labels if label != CONTROL}
    sizes = {label: n for label, n in sizes.items() if n > 0}
    controls = int(cell_counts.get(CONTROL, 0))
    if not sizes or controls == 0:
        return  # reported by the sampler with its own message
    largest = max(sizes.values())
    bound = min(largest, controls)
    if batch_size > bound:
        median = int(np.median(list(sizes.values())))
        raise BatchSizeError(
            f"{where}: train.batch_size is {batch_size}, but the largest training perturbation has "
            f"{largest} cells (median {median}) and there are {controls} control cells: every batch "
            f"would draw the same cells many times over. Fix: set train.batch_size to at most "
            f"{bound} (e.g. {min(bound, max(median, 1))}) for this dataset in config/config.yaml."
        )
    smaller = sorted(label for label, n in sizes.items() if n < batch_size)
    if smaller:
        logger.warning(
            "%s: %d of %d training perturbations have fewer cells than train.batch_size=%d and are "
            "drawn with replacement: %s",
            where,
            len(smaller),
            len(sizes),
            batch_size,
            _preview(smaller),
        )


# --------------------------------------------------------------------------------------------
# folds: enough held-out perturbations for the cell-eval profile
# --------------------------------------------------------------------------------------------

CELL_EVAL_PROFILES = ("full", "minimal", "vcc", "de", "anndata", "pds")
# Held-out perturbations a profile needs: clustering_agreement builds a neighbour graph over the
# perturbation centroids and pearson_edistance correlates distances between them, and both fail
# (inside scanpy/scipy, after training) with fewer than three. Measured with cell-eval 0.8.2.
MIN_PERTURBATIONS = {"full": 3, "anndata": 3}


class TooFewPerturbationsError(ValueError):
    """A fold holds out fewer perturbations than the configured cell-eval profile can score."""


# The profile a fold with too few held-out perturbations is scored with instead: the broadest
# profile that scores any number (pearson_delta, mse, mae, discrimination, DE overlap/precision).
FALLBACK_PROFILE = "minimal"


def scoring_profile(n_perturbations: int, profile: str, where: str) -> tuple[str, str]:
    """The cell-eval profile that scores ``n_perturbations``: ``profile`` if it can, else the fallback.

    Returns ``(profile used, note)``; the note (empty when ``profile`` is kept) says why another
    profile is used, for the log and the split file the report shows.
    """
    needed = MIN_PERTURBATIONS.get(profile, 1)
    if n_perturbations >= needed:
        return profile, ""
    note = (
        f"{where}: {n_perturbations} held-out perturbation(s), but cell-eval's {profile!r} profile needs at "
        f"least {needed} (clustering_agreement and pearson_edistance compare perturbations with each other): "
        f"scoring with the {FALLBACK_PROFILE!r} profile instead. To use {profile!r}, raise "
        f"split.heldout_fraction so that at least {needed} are held out."
    )
    return FALLBACK_PROFILE, note


def check_enough_perturbations(n_perturbations: int, profile: str, where: str, *, target: bool = False) -> None:
    """Raise :class:`TooFewPerturbationsError` before any work if ``profile`` cannot score the fold.

    ``target``: the perturbations are the scored ones of the ``target:`` context, not a fold's.
    """
    needed = MIN_PERTURBATIONS.get(profile, 1)
    if n_perturbations >= needed:
        return
    others = ", ".join(p for p in CELL_EVAL_PROFILES if MIN_PERTURBATIONS.get(p, 1) <= max(n_perturbations, 1))
    if target:
        what = f"the target context has {n_perturbations} perturbation(s) both predicted and observed"
        more = (
            "predict more observed target perturbations (the 'predict:' list of the dataset's "
            "'target:' block; empty means every observed one)"
        )
    else:
        what = f"the fold holds out {n_perturbations} perturbation(s)"
        more = (
            f"raise split.heldout_fraction for this dataset in config/config.yaml so that at least "
            f"{needed} are held out"
        )
    raise TooFewPerturbationsError(
        f"{where}: {what}, but cell-eval's {profile!r} profile needs at least {needed} (its "
        f"clustering_agreement and pearson_edistance metrics compare perturbations with each "
        f"other). Fix: {more}, or set score.profile to one that scores any number ({others})."
    )
