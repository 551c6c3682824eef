"""Checks of ``predict:`` entries against the data's genes (or drugs), with did-you-mean hints."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Mapping, Sequence

from ccfm import COMBO_SEPARATOR
from ccfm.data.conditions import CONTROL, CONTROL_TOKENS
from ccfm.data.validation.errors import (
    UnknownPerturbationError,
    preview,
)

log = logging.getLogger(__name__)


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
            + f". Drugs of the data: {preview(sorted(known))}. Fix: correct the drug names in the "
            "dataset's 'predict:' list in config/config.yaml (as the perturbation column spells them) or "
            "remove these entries."
        )
    return named
