"""Train/test splits of perturbation conditions, and the per-fold ``real.h5ad``.

Additive split (as in scDFM/GEARS "combo seen 2"): every single perturbation trains; the
doubles are shuffled with ``seed + fold`` and ``heldout_fraction`` of them (rounded, at least
one) are held out as the test set. Folds are independent reshuffles (fold ``i`` uses seed
``seed + i``), so ``n_folds`` only bounds the valid fold numbers.

Datasets without doubles (Datlinger, Papalexi, most CRISPR screens): the same procedure runs
on the singles instead -- ``heldout_fraction`` of the singles are held out, the rest train.

Gene perturbations outside the measured panel (``measured_genes`` given): a perturbed gene
without an expression column is embedded by a learned row that only its training cells teach
(:mod:`ccfm.data.perturbations`), so a condition is held out only if each of its unmeasured genes
still trains: in the additive split a double is eligible when each unmeasured partner has a
single; in the singles split an unmeasured single is never held out. Ineligible conditions train
and are listed as ``kept_in_train_unmeasured``; with every gene measured the split is unchanged.

Predict only (``heldout_fraction: 0``): nothing is held out, every condition trains (strategy
``predict_only``); the run predicts the dataset's ``predict:`` list and scores nothing.

Controls (``non-targeting``) are never a condition of either side; every split file names the
control label and ``real.h5ad`` contains all control cells. A held-out condition never appears
in ``train`` (checked in :func:`make_split`, which raises if it ever did).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from ccfm import COMBO_SEPARATOR, PERT_COLUMN
from ccfm.config import dataset_defaults, section_defaults
from ccfm.data.conditions import CONTROL, condition_type
from ccfm.data.gene_fill import GeneFill
from ccfm.data.validation import (
    FEW_CELLS,
    check_batch_size,
    few_cell_perturbations,
    scoring_profile,
    warn_doubles_missing_singles,
)
from ccfm.io.atomic import atomic_output
from ccfm.io.h5ad import (
    CHUNK_SIZE,
    CSRH5adWriter,
    iter_row_chunks,
    matrix_shape,
    read_obs_labels,
    read_obs_subset,
    read_var,
)
from ccfm.io.splits import SplitLeakError, write_split

log = logging.getLogger(__name__)

_SPLIT = section_defaults("split")
_PERTURBATION_TYPE = dataset_defaults()["perturbation_type"]


def _held_out(conditions: list[str], fraction: float, rng: np.random.Generator) -> set[str]:
    n_test = min(max(1, int(round(fraction * len(conditions)))), len(conditions))
    order = rng.permutation(len(conditions))
    return {conditions[i] for i in order[:n_test]}


def _can_hold_out(condition: str, measured: set[str], singles: set[str], strategy: str) -> bool:
    """Whether holding ``condition`` out still leaves training cells for each unmeasured gene."""
    unmeasured = [part for part in condition.split(COMBO_SEPARATOR) if part not in measured]
    if strategy == "singles":
        return not unmeasured  # a held-out single is its gene's only condition
    return all(part in singles for part in unmeasured)  # every single trains in the additive split


def _check_fold(fold: int, n_folds: int | None, heldout_fraction: float) -> None:
    if fold < 1 or (n_folds is not None and fold > n_folds):
        raise ValueError(f"fold must be in 1..{n_folds}, got {fold}; check config 'split.folds' and 'split.n_folds'")
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")


def _split_record(fold: int, seed: int, strategy: str, heldout_fraction: float, **sides: list[str]) -> dict[str, Any]:
    """The split file's entries in their order: ``sides`` are ``train``, ``test``, ``doubles_missing_singles``
    and ``kept_in_train_unmeasured``."""
    return {
        "fold": int(fold),
        "seed": int(seed + fold),
        "strategy": strategy,
        "heldout_fraction": float(heldout_fraction),
        "train": sides["train"],
        "test": sides["test"],
        "controls": CONTROL,
        "doubles_missing_singles": sides["doubles_missing_singles"],
        "kept_in_train_unmeasured": sides["kept_in_train_unmeasured"],
    }


def _predict_only_split(distinct: list[str], singles: list[str], doubles: list[str], fold: int, seed: int) -> dict:
    """``heldout_fraction: 0``: every condition trains, nothing is held out."""
    if not distinct:
        raise ValueError("cannot train: the data have no perturbed cells, only controls")
    log.info(
        "split fold %d: split.heldout_fraction is 0: nothing is held out; all %d conditions (%d singles, "
        "%d doubles) train, the run predicts the dataset's 'predict:' list and scores nothing",
        fold,
        len(distinct),
        len(singles),
        len(doubles),
    )
    incomplete = warn_doubles_missing_singles(distinct, f"split fold {fold}", log)
    return _split_record(
        fold,
        seed,
        "predict_only",
        0.0,
        train=distinct,
        test=[],
        doubles_missing_singles=incomplete,
        kept_in_train_unmeasured=[],
    )


def _strategy(singles: list[str], doubles: list[str]) -> tuple[str, list[str]]:
    """``additive`` (hold out doubles) when there are doubles, else ``singles``; and the candidates."""
    if doubles:
        return "additive", doubles
    if len(singles) >= 2:
        return "singles", singles
    raise ValueError(f"cannot split: need doubles or at least two singles, got {len(singles)} singles and no doubles")


def _always_train(
    candidates: list[str], measured_genes: Iterable[str], singles: list[str], strategy: str, fold: int
) -> list[str]:
    """Candidates whose holding out would leave an unmeasured gene without training cells (logged)."""
    measured, single_set = set(map(str, measured_genes)), set(singles)
    kept = [c for c in candidates if not _can_hold_out(c, measured, single_set, strategy)]
    if kept:
        log.info(
            "split fold %d: %d condition(s) always train: holding them out would leave an unmeasured "
            "gene without training cells: %s",
            fold,
            len(kept),
            ", ".join(kept[:20]),
        )
    if len(kept) == len(candidates):
        raise ValueError(
            f"cannot split fold {fold}: every {'double' if strategy == 'additive' else 'single'} involves a "
            f"perturbed gene that is not measured (absent from var) and has no other training condition, so "
            f"holding it out would leave nothing to learn that gene from ({len(kept)} such conditions). "
            f"Fix: set 'split: {{heldout_fraction: 0}}' for this dataset in config/config.yaml to train on "
            f"every condition and only predict its 'predict:' list (nothing is scored), or keep these genes "
            f"among the expression columns of the input file."
        )
    return kept


def _check_no_leak(test: set[str], train: list[str], singles: list[str], strategy: str) -> None:
    """Cannot fail by construction; guarded because a leak would void every metric."""
    leaked = test & set(train)
    if leaked:
        raise SplitLeakError(f"held-out conditions in train: {sorted(leaked)}")
    if strategy == "additive" and not set(singles) <= set(train):
        raise SplitLeakError("additive split must train on every single")


def make_split(
    conditions: Iterable[str],
    *,
    fold: int,
    seed: int,
    heldout_fraction: float,
    n_folds: int | None = None,
    measured_genes: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Split canonical condition labels into train and test for one fold (see module doc).

    ``measured_genes`` (gene datasets): the expression panel; conditions whose unmeasured genes
    would lose all training cells are not held out. None (drug datasets): no such restriction.

    Returns a JSON-able dict with keys ``fold``, ``seed`` (the seed actually used,
    ``seed + fold``), ``strategy`` (``additive`` or ``singles``), ``heldout_fraction``,
    ``train``, ``test`` (sorted lists), ``controls``, ``doubles_missing_singles`` and
    ``kept_in_train_unmeasured``.
    """
    _check_fold(fold, n_folds, heldout_fraction)
    distinct = sorted({c for c in conditions if c != CONTROL})
    singles = [c for c in distinct if condition_type(c) == "single"]
    doubles = [c for c in distinct if condition_type(c) == "double"]
    rng = np.random.default_rng(seed + fold)
    if heldout_fraction == 0:
        return _predict_only_split(distinct, singles, doubles, fold, seed)
    strategy, candidates = _strategy(singles, doubles)
    kept: list[str] = []
    if measured_genes is not None:
        kept = _always_train(candidates, measured_genes, singles, strategy, fold)
        candidates = [c for c in candidates if c not in set(kept)]
    test = _held_out(candidates, heldout_fraction, rng)
    train = [c for c in distinct if c not in test]
    incomplete = warn_doubles_missing_singles(distinct, f"split fold {fold}", log)
    _check_no_leak(test, train, singles, strategy)
    return _split_record(
        fold,
        seed,
        strategy,
        heldout_fraction,
        train=sorted(train),
        test=sorted(test),
        doubles_missing_singles=incomplete,
        kept_in_train_unmeasured=kept,
    )


def split_for_processed(
    processed: str | Path,
    *,
    fold: int,
    seed: int,
    heldout_fraction: float,
    n_folds: int | None = None,
    min_cells_per_perturbation: int = _SPLIT["min_cells_per_perturbation"],
    perturbation_type: str = _PERTURBATION_TYPE,
) -> dict[str, Any]:
    """:func:`make_split` over the conditions of a ``processed.h5ad`` (reads the labels and var only).

    Perturbations with fewer than ``min_cells_per_perturbation`` cells take part in neither
    side (listed under ``excluded_few_cells``); kept ones with fewer than
    :data:`ccfm.data.validation.FEW_CELLS` cells are logged, since their metrics are mostly noise.
    For gene perturbations its ``var_names`` are the measured genes (see :func:`make_split`).
    """
    counts = pd.Series(read_obs_labels(processed, PERT_COLUMN)).value_counts()
    excluded = few_cell_perturbations(counts, min_cells_per_perturbation)
    if excluded:
        log.warning(
            "%s: %d perturbation(s) with fewer than split.min_cells_per_perturbation=%d cells are left out "
            "of training and scoring: %s",
            processed,
            len(excluded),
            min_cells_per_perturbation,
            ", ".join(f"{k} ({v})" for k, v in list(excluded.items())[:20]),
        )
    noisy = {k: v for k, v in few_cell_perturbations(counts, FEW_CELLS).items() if k not in excluded}
    if noisy:
        log.warning(
            "%s: %d perturbation(s) have only 1-%d cells, so their metrics are mostly noise: %s. "
            "Set split.min_cells_per_perturbation (e.g. %d) in config/config.yaml to leave them out.",
            processed,
            len(noisy),
            FEW_CELLS - 1,
            ", ".join(f"{k} ({v})" for k, v in list(noisy.items())[:20]),
            FEW_CELLS,
        )
    kept = [label for label in counts.index if label not in excluded]
    measured = read_var(processed).index.astype(str) if perturbation_type == "gene" else None
    split = make_split(
        kept, fold=fold, seed=seed, heldout_fraction=heldout_fraction, n_folds=n_folds, measured_genes=measured
    )
    split["excluded_few_cells"] = sorted(excluded)
    split["n_cells"] = {
        "train": int(counts.reindex(split["train"]).fillna(0).sum()),
        "test": int(counts.reindex(split["test"]).fillna(0).sum()),
        "controls": int(counts.get(CONTROL, 0)),
    }
    return split


@dataclass(frozen=True)
class FoldChecks:
    """What a fold is checked against before anything is written: the cell-eval profile that will score
    it (``score.profile``) and ``train.batch_size``. Neither changes the split itself."""

    cell_eval_profile: str
    batch_size: int


def check_fold_usable(processed: str | Path, split: dict[str, Any], checks: FoldChecks) -> dict[str, Any]:
    """Fail before training if the fold cannot be batched; choose the cell-eval profile that scores it.

    ``train.batch_size`` must fit the training cells (:func:`ccfm.data.validation.check_batch_size`).
    With fewer held-out perturbations than ``checks.cell_eval_profile`` needs, the fold is scored with a
    profile that scores any number (:func:`ccfm.data.validation.scoring_profile`, logged). Returns the
    split file's ``score_profile`` entry: ``configured``, ``used`` and a ``note`` (empty when unchanged).
    """
    where = f"{processed} (fold {split['fold']})"
    profile = checks.cell_eval_profile
    counts = pd.Series(read_obs_labels(processed, PERT_COLUMN)).value_counts().to_dict()
    check_batch_size(counts, split["train"], int(checks.batch_size), where, log)
    if not split["test"]:
        return {"configured": profile, "used": None, "note": "nothing held out: nothing is scored"}
    used, note = scoring_profile(len(split["test"]), profile, where)
    if note:
        log.warning("%s", note)
    return {"configured": profile, "used": used, "note": note}


def write_real(
    processed: str | Path,
    split: dict[str, Any],
    out: str | Path,
    chunk_size: int = CHUNK_SIZE,
    fill: GeneFill | None = None,
) -> int:
    """Write ``real.h5ad``: the held-out cells of the fold plus all control cells; return n cells.

    Streams the rows of ``processed.h5ad`` (X only, log1p scale) in file order; the label columns
    of ``obs`` are kept, so the file matches the predictions' layout. With ``fill`` the cells are
    written on every gene of the input, as the predictions are (:mod:`ccfm.data.gene_fill`: the
    genes left out of modelling take the cells' own normalised values); else on the modelled genes.
    """
    processed, out = Path(processed), Path(out)
    labels = read_obs_labels(processed, PERT_COLUMN)
    rows = np.flatnonzero(pd.Series(labels).isin(set(split["test"]) | {CONTROL}).to_numpy())
    var = read_var(processed) if fill is None else fill.var()
    out_obs = read_obs_subset(processed, rows, [PERT_COLUMN, "condition_type", "original_condition"])
    n_chunks = -(-matrix_shape(processed)[0] // chunk_size)
    chunks = iter_row_chunks(processed, chunk_size, rows=rows)
    if fill is not None:
        full_rows = dataclasses.replace(fill, chunk_size=chunk_size).iter_rows(rows)  # the same row blocks
        chunks = ((start, fill.combine(chunk, next(full_rows)[1])) for start, chunk in chunks)
    with atomic_output(out) as tmp:
        with CSRH5adWriter(tmp, var) as writer:
            for _, chunk in tqdm(chunks, total=n_chunks, desc="real cells", unit="chunk"):
                writer.append(chunk)
            writer.finish(
                out_obs, uns={"ccfm": {"fold": split["fold"], "test": list(split["test"]), "controls": CONTROL}}
            )
    log.info(
        "wrote %s: %d held-out cells + %d control cells",
        out,
        int((labels[rows] != CONTROL).sum()),
        int((labels == CONTROL).sum()),
    )
    return int(rows.size)


@dataclass(frozen=True, kw_only=True)
class SplitSettings:
    """How a fold is drawn: the run's seed, the ``split`` section (defaults: the schema's), the dataset's
    ``perturbation_type`` (gene datasets keep conditions whose unmeasured genes would lose all training
    cells in train) and the rows streamed at a time."""

    seed: int
    heldout_fraction: float = _SPLIT["heldout_fraction"]
    n_folds: int = _SPLIT["n_folds"]
    min_cells_per_perturbation: int = _SPLIT["min_cells_per_perturbation"]
    perturbation_type: str = _PERTURBATION_TYPE
    chunk_size: int = CHUNK_SIZE


def split_to_files(
    processed: str | Path,
    out_split: str | Path,
    out_real: str | Path,
    *,
    fold: int,
    settings: SplitSettings,
    checks: FoldChecks,
    genes_tsv: str | Path | None = None,
    raw: str | Path | None = None,
) -> dict[str, Any]:
    """The ``split`` rule: choose the fold, check later rules can use it, write ``real.h5ad`` and the split file.

    With ``genes_tsv`` and the ``raw`` input, ``real.h5ad`` holds every gene of the input (see :func:`write_real`).
    """
    split = split_for_processed(
        processed,
        fold=fold,
        seed=settings.seed,
        heldout_fraction=settings.heldout_fraction,
        n_folds=settings.n_folds,
        min_cells_per_perturbation=settings.min_cells_per_perturbation,
        perturbation_type=settings.perturbation_type,
    )
    split["score_profile"] = check_fold_usable(processed, split, checks)
    fill = None
    if genes_tsv is not None and raw is not None:
        fill = GeneFill.from_files(genes_tsv, processed, raw, chunk_size=settings.chunk_size)
        split["genes"] = fill.counts
    write_real(processed, split, out_real, chunk_size=settings.chunk_size, fill=fill)
    write_split(split, out_split)
    return split
