"""Perturbed genes of a dataset by status (measured, unmeasured but perturbed in the cells, unmeasured
and unseen; or drugs), logged and written to ``perturbed_genes.tsv``, and ``predict:`` entries checked
against the genes or drugs the model can embed."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from ccfm.config import dataset_defaults
from ccfm.data.conditions import (
    perturbed_names,
)
from ccfm.data.validation import (
    validate_drug_predict_entries,
    validate_predict_entries,
)
from ccfm.io.atomic import atomic_output

log = logging.getLogger(__name__)

_PERTURBATION_TYPE = dataset_defaults()["perturbation_type"]


# Status of each perturbed gene (or drug) of a dataset, as written to perturbed_genes.tsv.
PERTURBED_STATUS = {
    "measured": "in var (kept among the genes): the perturbation shares the gene's expression-token embedding",
    "unmeasured_seen": "not in var, perturbed in the data's cells: the perturbation gets a learned embedding "
    "row of its own",
    "unmeasured_unseen": (
        "not in var and perturbed in no cell (named only in 'predict:'): rejected, nothing to learn it from"
    ),
    "drug": "drug perturbation: a learned embedding table, the gene panel is not involved",
    "case_matched": "label spelled in another letter case than a gene column (or than other labels): "
    "matched ignoring case, as the scGPT vocabulary map does (label -> name used)",
}


_TABLE_GENES = 50  # genes listed per status in the table (the counts are always complete)


def perturbed_status(
    perturbed: list[str], measured: pd.Index, requested: list[str], perturbation_type: str = _PERTURBATION_TYPE
) -> dict[str, list[str]]:
    """Perturbed names (from the cells' labels and ``requested`` ``predict:`` genes) by status."""
    if perturbation_type == "drug":
        return {"drug": sorted(set(perturbed) | set(requested))}
    in_cells = set(perturbed)
    named = sorted(in_cells | set(requested))
    is_measured = set(measured.astype(str))
    return {
        "measured": [g for g in named if g in is_measured],
        "unmeasured_seen": [g for g in named if g not in is_measured and g in in_cells],
        "unmeasured_unseen": [g for g in named if g not in is_measured and g not in in_cells],
    }


def perturbed_status_table(status: dict[str, list[str]]) -> pd.DataFrame:
    """One row per status: how many genes, what it means for the model, which genes."""
    rows = []
    for name, genes in status.items():
        shown = ", ".join(genes[:_TABLE_GENES]) + (f", ... ({len(genes)} in all)" if len(genes) > _TABLE_GENES else "")
        rows.append({"status": name, "n_genes": len(genes), "meaning": PERTURBED_STATUS[name], "genes": shown})
    return pd.DataFrame(rows, columns=["status", "n_genes", "meaning", "genes"])


def log_perturbed_status(status: dict[str, list[str]], path: Path) -> None:
    if "drug" in status:
        log.info("%s: %d drugs (learned embedding table)", path, len(status["drug"]))
        return
    log.info(
        "%s: perturbed genes: %d measured (share the gene embedding), %d unmeasured but perturbed in the data "
        "(own learned rows), %d unmeasured and unseen",
        path,
        len(status["measured"]),
        len(status["unmeasured_seen"]),
        len(status["unmeasured_unseen"]),
    )
    if status["unmeasured_seen"]:
        genes = status["unmeasured_seen"]
        log.info("unmeasured perturbed genes: %s%s", ", ".join(genes[:20]), " ..." if len(genes) > 20 else "")


def write_perturbed_status(
    status: dict[str, list[str]], path: str | Path, case_matched: dict[str, str] | None = None
) -> None:
    rows = dict(status)
    if case_matched:
        rows["case_matched"] = [f"{label} -> {name}" for label, name in sorted(case_matched.items())]
    with atomic_output(Path(path)) as tmp:
        perturbed_status_table(rows).to_csv(tmp, sep="\t", index=False)


def validate_predict(
    entries: list[str] | tuple[str, ...],
    perturbation_type: str,
    genes: pd.Index,
    canonical_labels: pd.Series,
    *,
    where: str,
    perturbed_source: pd.Series | None = None,
) -> list[str]:
    """``predict:`` entries checked against the data's genes, or its drugs for a drug dataset.

    A gene entry may name a gene that is measured or one that the training cells perturb
    (``perturbed_source``: the labels whose cells train the model; default ``canonical_labels``).
    Returns the genes to keep in the output (none for drugs: a drug is not a column).
    """
    if perturbation_type == "drug":
        validate_drug_predict_entries(entries, perturbed_names(pd.unique(canonical_labels.astype(str))), where=where)
        return []
    trained = canonical_labels if perturbed_source is None else perturbed_source
    perturbed = perturbed_names(pd.unique(trained.astype(str)))
    return validate_predict_entries(entries, genes, perturbed=perturbed, where=where)
