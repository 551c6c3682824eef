"""Canonical perturbation labels.

Every dataset spells conditions its own way: scPerturb's Norman file writes doubles as
``AHR_FEV`` and controls as ``control``; GEARS writes ``ctrl``, ``AHR+ctrl`` and ``AHR+FEV``;
CROP-seq releases (Datlinger) label guides ``ZAP70_1``/``ZAP70_2``. Internally the pipeline uses
one form: ``non-targeting`` for controls, ``A`` for a single, ``A+B`` (sorted) for a double.

Parsing rule (documented so users can predict it):

1. Strip whitespace. A label equal to the configured control label, or to one of the
   well-known control spellings (:data:`CONTROL_TOKENS`, case-insensitive), is a control.
2. Split on the configured separator and always also on ``+`` (GEARS style).
3. Drop tokens that are control spellings (``ctrl`` in ``A+ctrl``).
4. Guide indices: a token matching ``guide_token_pattern`` (default: all digits) is the guide
   number of the preceding gene, not a gene, and is dropped. So with separator ``_`` the label
   ``ZAP70_1`` is the single ``ZAP70``, while ``AHR_FEV`` is the double ``AHR+FEV``. Real HGNC
   symbols never consist only of digits, so this never drops a gene. Set
   ``guide_token_pattern=None`` to disable (e.g. drugs whose names may be numbers).
5. The remaining names are de-duplicated (two guides of one gene are one perturbation), sorted
   and joined with ``+``. Zero names -> control, one -> single, two -> double, more -> error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd

from ccfm import COMBO_SEPARATOR, CONTROL_LABEL, PERT_COLUMN

CONTROL = CONTROL_LABEL
CONDITION_TYPES = ("control", "single", "double")
# Spellings of "no perturbation" seen in public releases (scPerturb, GEARS, CROP-seq, VCC).
CONTROL_TOKENS = frozenset(
    {"ctrl", "control", "non-targeting", "nontargeting", "non_targeting", "nt", "safe-targeting"}
)
DEFAULT_GUIDE_TOKEN = r"^\d+$"


class ConditionError(ValueError):
    """A perturbation label cannot be parsed into at most two perturbations."""


@dataclass(frozen=True)
class Condition:
    """A parsed label: canonical form, its type and the genes (or drugs) it perturbs."""

    canonical: str
    condition_type: str
    perturbations: tuple[str, ...]


def _split_tokens(label: str, separator: str) -> list[str]:
    separators = {separator, COMBO_SEPARATOR}
    pattern = "|".join(re.escape(s) for s in sorted(separators, key=len, reverse=True))
    return [token.strip() for token in re.split(pattern, label)]


def parse_condition(
    label: str,
    *,
    control_label: str = CONTROL,
    separator: str = COMBO_SEPARATOR,
    guide_token_pattern: str | None = DEFAULT_GUIDE_TOKEN,
) -> Condition:
    """Parse one perturbation label following the module's rule; see the module docstring."""
    text = str(label).strip()
    if not text or text.lower() in ("nan", "none"):
        # Unassigned cells must not silently join the controls (they would bias every delta).
        raise ConditionError(f"empty perturbation label {label!r}: drop unassigned cells or label them")
    controls = CONTROL_TOKENS | {control_label.strip().lower()}
    if text.lower() in controls:
        return Condition(CONTROL, "control", ())
    guide = re.compile(guide_token_pattern) if guide_token_pattern else None
    names: list[str] = []
    for token in _split_tokens(text, separator):
        if not token or token.lower() in controls:
            continue
        if guide is not None and guide.fullmatch(token):
            if not names:
                raise ConditionError(
                    f"perturbation label {label!r}: token {token!r} looks like a guide index but follows no gene name"
                )
            continue
        if token not in names:
            names.append(token)
    perturbations = tuple(sorted(names))
    if len(perturbations) > 2:
        raise ConditionError(
            f"perturbation label {label!r} names {len(perturbations)} perturbations "
            f"{list(perturbations)} (separator {separator!r}); the pipeline models controls, "
            f"singles and doubles only: drop these cells or fix 'combo_separator' in the config"
        )
    if not perturbations:
        return Condition(CONTROL, "control", ())
    kind = "single" if len(perturbations) == 1 else "double"
    return Condition(COMBO_SEPARATOR.join(perturbations), kind, perturbations)


def canonicalize_labels(
    labels: Iterable[str] | pd.Series,
    *,
    control_label: str = CONTROL,
    separator: str = COMBO_SEPARATOR,
    guide_token_pattern: str | None = DEFAULT_GUIDE_TOKEN,
) -> pd.DataFrame:
    """Parse a column of labels (each distinct label once) into the ``obs`` columns.

    Returns a frame with ``target_gene``, ``condition_type`` (categorical) and
    ``original_condition`` in the input order and with the input index when given a Series.
    """
    series = labels if isinstance(labels, pd.Series) else pd.Series(list(labels))
    original = series.astype(str)
    parsed = {
        value: parse_condition(
            value, control_label=control_label, separator=separator, guide_token_pattern=guide_token_pattern
        )
        for value in pd.unique(original)
    }
    frame = pd.DataFrame(
        {
            PERT_COLUMN: original.map(lambda v: parsed[v].canonical).astype("category"),
            "condition_type": pd.Categorical(
                original.map(lambda v: parsed[v].condition_type), categories=list(CONDITION_TYPES)
            ),
            "original_condition": original.astype("category"),
        },
        index=series.index,
    )
    return frame


def perturbed_names(canonical_labels: Iterable[str]) -> list[str]:
    """Sorted distinct gene (or drug) names appearing in canonical labels, controls excluded."""
    names: set[str] = set()
    for label in canonical_labels:
        if label != CONTROL:
            names.update(label.split(COMBO_SEPARATOR))
    return sorted(names)


def split_double(label: str) -> tuple[str, str]:
    """The two singles of a canonical double ``A+B``; error for anything else."""
    parts = label.split(COMBO_SEPARATOR)
    if len(parts) != 2:
        raise ConditionError(f"{label!r} is not a canonical double 'A+B'")
    return parts[0], parts[1]


def condition_type(label: str) -> str:
    """Type of a canonical label: ``control``, ``single`` or ``double``."""
    if label == CONTROL:
        return "control"
    return "single" if COMBO_SEPARATOR not in label else "double"


def summarize_conditions(canonical: Sequence[str]) -> dict[str, int]:
    """Counts of distinct conditions per type (for logs and the report)."""
    counts = {kind: 0 for kind in CONDITION_TYPES}
    for label in set(canonical):
        counts[condition_type(label)] += 1
    return counts


def conditions_to_predict(test: Iterable[str], extra: Iterable[str], control_label: str = CONTROL_LABEL) -> list[str]:
    """The fold's held-out perturbations followed by config ``predict:`` entries (canonicalised, deduplicated)."""
    ordered: list[str] = []
    for label in [*test, *map(str, extra)]:
        canonical = parse_condition(label, control_label=control_label).canonical
        if canonical != CONTROL and canonical not in ordered:
            ordered.append(canonical)
    return ordered


def match_label_case(canonical_labels: pd.Series, genes: Iterable[str]) -> tuple[pd.Series, dict[str, str]]:
    """Spell each perturbed name as its gene column does, matching letter case as the scGPT vocabulary does.

    A name absent from ``genes`` but equal to exactly one of them ignoring case (``gata1`` and
    ``GATA1``) takes the gene's spelling, so the perturbation keeps its link to that expression
    column. Names matching no gene but spelled in several cases among the labels take the most
    frequent spelling (ties: the first in sorted order). Returns the relabelled series (doubles
    re-sorted into canonical ``A+B``) and ``{label spelling: chosen spelling}`` of every change.
    """
    gene_list = [str(g) for g in genes]
    exact = set(gene_list)
    by_lower: dict[str, list[str]] = {}
    for gene in gene_list:
        by_lower.setdefault(gene.lower(), []).append(gene)
    labels = canonical_labels.astype(str)
    counts = labels.value_counts()
    name_counts: dict[str, int] = {}
    for label, n in counts.items():
        if label != CONTROL:
            for name in label.split(COMBO_SEPARATOR):
                name_counts[name] = name_counts.get(name, 0) + int(n)
    mapping: dict[str, str] = {}
    spellings: dict[str, list[str]] = {}
    for name in sorted(name_counts):
        if name in exact:
            continue
        column = by_lower.get(name.lower(), [])
        if len(column) == 1:
            mapping[name] = column[0]
        elif not column:
            spellings.setdefault(name.lower(), []).append(name)
    for variants in spellings.values():
        if len(variants) > 1:
            chosen = sorted(variants, key=lambda v: (-name_counts[v], v))[0]
            mapping.update({v: chosen for v in variants if v != chosen})
    if not mapping:
        return canonical_labels, {}

    def relabel(label: str) -> str:
        if label == CONTROL:
            return label
        return COMBO_SEPARATOR.join(sorted({mapping.get(name, name) for name in label.split(COMBO_SEPARATOR)}))

    renamed = {label: relabel(label) for label in counts.index}
    result = labels.map(renamed)
    if isinstance(canonical_labels.dtype, pd.CategoricalDtype):
        result = result.astype("category")
    return result, mapping
