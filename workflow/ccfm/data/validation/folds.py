"""Checks of a fold against what later rules need: few-cell perturbations, a ``train.batch_size`` the
training cells can fill, and enough held-out perturbations for the cell-eval profile."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from ccfm.data.conditions import CONTROL
from ccfm.data.validation.errors import (
    BatchSizeError,
    preview,
)

log = logging.getLogger(__name__)


# Perturbations with fewer cells than this get a warning: their metrics are mostly noise.
FEW_CELLS = 3


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
            preview(smaller),
        )


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
