"""Checks of ``obs``: the perturbation column, labelled cells, control cells (with near-miss control
labels), unique cell names, gene symbols rather than numbers, doubles written with another separator,
and doubles whose singles are missing."""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from ccfm.data.conditions import CONTROL, CONTROL_TOKENS, condition_type, split_double
from ccfm.data.validation.errors import (
    PREVIEW_ITEMS,
    ComboSeparatorError,
    ControlLabelMismatchError,
    DuplicateCellsError,
    MissingColumnError,
    MissingLabelError,
    NoControlCellsError,
    NotGeneSymbolsError,
    preview,
)

log = logging.getLogger(__name__)


# Substrings that betray a control label spelled in a way the parser does not know.
_CONTROL_HINTS = ("ctrl", "control", "non-target", "nontarget", "non_target", "ntc", "safe", "scrambl", "neg")


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
            f"{preview(list(map(str, labels.index[empty.to_numpy()][:5])))}). Fix: drop these "
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
            f"similar labels exist: {preview(near, 5)}. Fix: set 'control_label: {near[0]}' for "
            f"this dataset in config/config.yaml (or relabel the control cells)."
        )
    raise NoControlCellsError(
        f"{path}: no control cells: no label in obs[{column!r}] equals the control label "
        f"{control_label!r} (labels seen: {preview(sorted(labels.astype(str).unique()), 8)}). "
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
            preview(incomplete, 20),
        )
    return incomplete


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
    examples = ", ".join(list(joined)[:PREVIEW_ITEMS])
    raise ComboSeparatorError(
        f"{path}: {len(joined)} of the {len(unmeasured)} perturbed names without an expression column are "
        f"two gene names joined by {char!r} ({examples}): these look like doubles written with {char!r}, "
        f"but combo_separator is {separator!r}, so each would be read as one unmeasured gene. Fix: set "
        f"'combo_separator: \"{char}\"' for this dataset in config/config.yaml."
    )


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
        f"({preview([f'{c} x{n}' for c, n in dups.items()])}). Fix: make them unique "
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
            f"({preview(sorted(numeric, key=lambda v: (len(v), v)))}; {len(numeric)} "
            f"of {len(distinct)} perturbation labels): the column is not gene symbols. With "
            f"'perturbation_type: gene' every label names the perturbed gene(s), e.g. 'KLF1' or "
            f"'KLF1+MAP2K6'. Fix: set 'perturbation_column' to the column that holds the target gene "
            f"symbols (obs columns: {list(map(str, obs_columns))}), or 'perturbation_type: drug' if "
            f"the numbers are compound ids."
        )
