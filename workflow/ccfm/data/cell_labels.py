"""The cells' perturbation labels, made canonical (``target_gene``, ``condition_type``,
``original_condition``) after the ``obs`` checks, and spelled like their gene columns; and
:class:`InputSettings`, how an input file's cells are labelled and its values scaled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ccfm import PERT_COLUMN
from ccfm.config import dataset_defaults
from ccfm.data.conditions import (
    DEFAULT_GUIDE_TOKEN,
    ConditionError,
    canonicalize_labels,
    condition_type,
    match_label_case,
)
from ccfm.data.validation import (
    LabelParseError,
    check_cell_names,
    check_controls,
    check_gene_labels,
    check_labels_present,
    check_perturbation_column,
)

log = logging.getLogger(__name__)


_DATASET = dataset_defaults()


@dataclass(frozen=True, kw_only=True)
class InputSettings:
    """How an input file is read: the dataset-level config keys (defaults: the schema's).

    ``guide_token_pattern``: guide indices stripped from gene labels (``ZAP70_1``); the rules pass
    None for drug datasets, whose names may be numbers.
    """

    perturbation_column: str = _DATASET["perturbation_column"]
    control_label: str = _DATASET["control_label"]
    combo_separator: str = _DATASET["combo_separator"]
    input_scale: str = _DATASET["input_scale"]
    perturbation_type: str = _DATASET["perturbation_type"]
    guide_token_pattern: str | None = DEFAULT_GUIDE_TOKEN


def canonical_obs(obs: pd.DataFrame, settings: InputSettings, path: Path) -> pd.DataFrame:
    """obs with ``target_gene``, ``condition_type`` and ``original_condition`` (canonical labels).

    Raises the :mod:`ccfm.data.validation` errors for a missing column, unlabelled cells, duplicated
    cell names, numbers where a gene dataset needs symbols, unparsable labels and the absence of
    control cells (suggesting a near-matching control label when there is one).
    """
    perturbation_column, control_label = settings.perturbation_column, settings.control_label
    check_perturbation_column(obs, perturbation_column, path)
    check_cell_names(obs, path)
    labels = obs[perturbation_column]
    check_labels_present(labels, perturbation_column, control_label, path)
    if settings.perturbation_type == "gene":
        check_gene_labels(labels, perturbation_column, control_label, path, list(obs.columns))
    try:
        parsed = canonicalize_labels(
            labels,
            control_label=control_label,
            separator=settings.combo_separator,
            guide_token_pattern=settings.guide_token_pattern,
        )
    except ConditionError as error:
        raise LabelParseError(
            f"{path}: obs[{perturbation_column!r}]: {error}. Fix: check 'perturbation_column' and "
            f"'combo_separator' (now {settings.combo_separator!r}) for this dataset in config/config.yaml."
        ) from None
    kept = obs.drop(columns=[c for c in parsed.columns if c in obs.columns])
    result = pd.concat([kept, parsed], axis=1)
    result.index = result.index.astype(str)
    check_controls(labels, result["condition_type"], perturbation_column, control_label, path)
    return result


def relabel_case(obs: pd.DataFrame, genes: pd.Index, path: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """Canonical labels spelled like their gene columns (:func:`ccfm.data.conditions.match_label_case`), logged."""
    labels, matched = match_label_case(obs[PERT_COLUMN], genes)
    if not matched:
        return obs, {}
    obs = obs.copy()
    obs[PERT_COLUMN] = labels
    obs["condition_type"] = pd.Categorical(
        labels.astype(str).map(condition_type), categories=list(obs["condition_type"].cat.categories)
    )
    shown = ", ".join(f"{label} -> {name}" for label, name in list(sorted(matched.items()))[:20])
    log.warning(
        "%s: %d perturbation name(s) matched to a gene (or label) spelled in another letter case, as the scGPT "
        "vocabulary map does: %s%s",
        path,
        len(matched),
        shown,
        " ..." if len(matched) > 20 else "",
    )
    return obs, matched
