"""Expression scale of an input: raw counts or log1p values, detected from a row sample; an explicit
``input_scale`` that contradicts the data is an error naming the fix."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ccfm.config import dataset_defaults
from ccfm.data.validation import (
    InputValidationError,
    InvalidValuesError,
)
from ccfm.io.h5ad import (
    has_layer,
    iter_row_chunks,
    matrix_shape,
)

log = logging.getLogger(__name__)

# The schema's default input_scale ("auto": detected from the data).
_CONFIGURED_SCALE = dataset_defaults()["input_scale"]


SCALES = ("counts", "log1p")


# log1p of normalised data rarely exceeds ~12 (log1p(1e4 * 1) = 9.2 at target_sum 1e4); raw
# non-integer values above this are some other normalisation the pipeline does not accept.
_MAX_LOG1P_VALUE = 30.0


_DETECTION_ROWS = 2000


# Share of whole numbers among non-integer data above which they are taken for non-integer
# counts: log1p(x) is a whole number only for x = e^k - 1, so log1p data have almost none.
_NONINTEGER_COUNTS_WHOLE_FRACTION = 0.5


class ScaleError(InputValidationError):
    """The expression scale of an input is unsupported or contradicts the configuration."""


class NegativeValuesError(ScaleError, InvalidValuesError):
    """Negative values found by scale detection (scaled/z-scored data): both a scale and a value error."""


def _sample_values(path: Path, layer: str | None, n_rows: int) -> np.ndarray:
    """Non-zero values of up to ``n_rows`` rows taken from the start, middle and end of X."""
    n_obs = matrix_shape(path, layer)[0]
    window = max(1, n_rows // 3)
    starts = sorted({0, max(0, n_obs // 2 - window // 2), max(0, n_obs - window)})
    rows = np.unique(np.concatenate([np.arange(s, min(s + window, n_obs)) for s in starts]))
    values = [chunk.data for _, chunk in iter_row_chunks(path, max(window, 1), layer, rows=rows)]
    return np.concatenate(values) if values else np.zeros(0, dtype=np.float32)


def classify_values(values: np.ndarray, where: str, configured: str = _CONFIGURED_SCALE) -> str:
    """``counts`` if all values are non-negative integers, ``log1p`` if small non-integers.

    Non-integer values of which many are whole numbers are non-integer *counts* (ambient-RNA
    corrected, e.g. SoupX/DecontX): log1p-normalised values are almost never whole numbers.
    Under ``auto`` that is an error stating the evidence (treating them as log1p would skip
    normalisation); an explicit ``configured`` scale decides.
    """
    # NaN/inf are reported with their rows by the streaming check of every chunk
    # (ccfm.data.validation.check_chunk_values); the scale is judged on the finite values.
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ScaleError(f"{where}: the sampled rows contain no non-zero finite value; is the matrix empty?")
    if np.any(values < 0):
        raise NegativeValuesError(
            f"{where}: negative values (min {values.min():.3g}): the data look scaled/z-scored. "
            f"Fix: provide raw counts or log1p-normalised values (e.g. adata.layers['counts'] or adata.raw)."
        )
    whole = np.equal(np.mod(values, 1), 0)
    if whole.all():
        return "counts"
    whole_fraction = float(whole.mean())
    if whole_fraction >= _NONINTEGER_COUNTS_WHOLE_FRACTION:
        evidence = (
            f"{1 - whole_fraction:.1%} of the sampled non-zero values are non-integer but "
            f"{whole_fraction:.1%} are whole numbers (max {values.max():.4g})"
        )
        if configured in SCALES:
            log.warning("%s: %s: non-integer counts? using input_scale: %s as configured", where, evidence, configured)
            return configured
        raise ScaleError(
            f"{where}: {evidence}. This looks like non-integer counts (ambient-RNA corrected, e.g. "
            f"SoupX/DecontX), not log1p data (log1p-normalised values are almost never whole "
            f"numbers); with input_scale: auto they would be taken for log1p and never normalised. "
            f"Fix: set 'input_scale: counts' for this dataset in config/config.yaml (in its 'target:' "
            f"block for a target file) to normalise them "
            f"as counts (better: provide the raw integer counts, e.g. in layers['counts']), or "
            f"'input_scale: log1p' if they really are log1p values."
        )
    if values.max() <= _MAX_LOG1P_VALUE:
        return "log1p"
    raise ScaleError(
        f"{where}: non-integer values up to {values.max():.3g}, only {whole_fraction:.1%} of them whole "
        f"numbers: neither raw counts nor log1p data (normalised but not log-transformed?). Provide "
        f"raw counts or log1p-normalised values (for ambient-RNA corrected counts: the raw counts, "
        f"e.g. in layers['counts'])."
    )


def detect_input_scale(
    path: str | Path, layer: str | None = None, n_rows: int = _DETECTION_ROWS, configured: str = _CONFIGURED_SCALE
) -> str:
    """Detect whether X (or a layer) holds raw counts or log1p values, from a row sample.

    ``configured`` only settles the ambiguous case of non-integer counts (:func:`classify_values`).
    """
    path = Path(path)
    where = f"{path} ({'X' if layer is None else 'layers/' + layer})"
    return classify_values(_sample_values(path, layer, n_rows), where, configured)


def resolve_input_scale(configured: str, detected: str, path: str | Path) -> str:
    """The scale to use: the detected one for ``auto``; an explicit contradiction is an error."""
    if configured not in ("auto", *SCALES):
        raise ScaleError(f"input_scale must be auto, counts or log1p, got {configured!r}")
    if configured != "auto" and configured != detected:
        seen = {
            "counts": "non-negative integers (raw counts)",
            "log1p": "non-integer values <= 30 (already normalised and log1p-transformed)",
        }[detected]
        consequence = (
            "counts are expected, and log1p data would be normalised and log-transformed a second time"
            if configured == "counts"
            else "log1p values are expected, and raw counts would be used without normalisation"
        )
        raise ScaleError(
            f"{path}: config says input_scale: {configured} but the data look like {detected} "
            f"(a sample of rows holds {seen}); {consequence}. Fix: set 'input_scale: {detected}' "
            f"(or 'auto') for this dataset in config/config.yaml, put the raw counts in "
            f"layers['counts'], or check that the right file is configured."
        )
    return detected


def choose_matrix(path: Path, configured_scale: str) -> tuple[str | None, str]:
    """Pick the element to read (X, or layers/counts when X is log1p) and its scale."""
    detected = detect_input_scale(path, configured=configured_scale)
    if detected == "log1p" and configured_scale in ("auto", "counts") and has_layer(path, "counts"):
        # Many public files keep log1p in X and the raw counts in a layer: prefer the counts.
        if detect_input_scale(path, layer="counts", configured=configured_scale) == "counts":
            log.info("%s: X is log1p; using raw counts from layers['counts']", path)
            return "counts", resolve_input_scale(configured_scale, "counts", path)
    return None, resolve_input_scale(configured_scale, detected, path)
