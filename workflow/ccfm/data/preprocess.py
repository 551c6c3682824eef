"""Streaming preprocessing: scale detection, normalize_total + log1p, HVGs, condition labels.

Two passes over the input, one row chunk at a time (memory flat in the number of cells):

1. per-cell library sizes and per-gene mean/variance of the normalised expression (merged
   across chunks with Chan's parallel formula), from which genes are ranked by Seurat-style
   binned normalised dispersion (as ``scanpy.pp.highly_variable_genes(flavor="seurat")``:
   dispersion = var/mean of ``expm1(log data)``, log-transformed, z-scored within 20 bins of
   log mean expression);
2. the selected columns (top ``n_top_genes`` ∪ every perturbed gene present) are normalised,
   log1p-transformed and appended to a CSR h5ad together with the raw counts.

Output layout: docs/architecture.md, ``processed.h5ad``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm

from ccfm import COMBO_SEPARATOR, PERT_COLUMN
from ccfm.config import section_defaults
from ccfm.data.conditions import (
    CONTROL,
    DEFAULT_GUIDE_TOKEN,
    ConditionError,
    canonicalize_labels,
    condition_type,
    match_label_case,
    perturbed_names,
    summarize_conditions,
)
from ccfm.data.gene_fill import (
    LIBRARY_SIZE_COLUMN,
    describe_gene_counts,
    gene_counts,
    gene_status_table,
    write_gene_table,
)
from ccfm.data.moments import RunningMoments
from ccfm.data.validation import (
    InputValidationError,
    InvalidValuesError,
    LabelParseError,
    check_cell_names,
    check_chunk_values,
    check_combo_separator,
    check_controls,
    check_gene_labels,
    check_gene_names,
    check_labels_present,
    check_perturbation_column,
    check_readable_h5ad,
    check_target_gene_overlap,
    predict_entry_genes,
    validate_drug_predict_entries,
    validate_predict_entries,
    warn_doubles_missing_singles,
)
from ccfm.io.h5ad import (
    CHUNK_SIZE,
    CSRH5adWriter,
    atomic_output,
    has_layer,
    iter_row_chunks,
    matrix_shape,
    read_obs,
    read_obs_labels,
    read_var,
)

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------------------------
# Scale detection
# --------------------------------------------------------------------------------------------


def _sample_values(path: Path, layer: str | None, n_rows: int) -> np.ndarray:
    """Non-zero values of up to ``n_rows`` rows taken from the start, middle and end of X."""
    n_obs = matrix_shape(path, layer)[0]
    window = max(1, n_rows // 3)
    starts = sorted({0, max(0, n_obs // 2 - window // 2), max(0, n_obs - window)})
    rows = np.unique(np.concatenate([np.arange(s, min(s + window, n_obs)) for s in starts]))
    values = [chunk.data for _, chunk in iter_row_chunks(path, max(window, 1), layer, rows=rows)]
    return np.concatenate(values) if values else np.zeros(0, dtype=np.float32)


def classify_values(values: np.ndarray, where: str, configured: str = "auto") -> str:
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
    path: str | Path, layer: str | None = None, n_rows: int = _DETECTION_ROWS, configured: str = "auto"
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


# --------------------------------------------------------------------------------------------
# Normalisation and streaming statistics
# --------------------------------------------------------------------------------------------


def normalize_log1p(counts: sp.csr_matrix, totals: np.ndarray, target_sum: float) -> sp.csr_matrix:
    """``log1p(counts / total * target_sum)`` row-wise, keeping the sparsity pattern.

    ``totals`` are the per-cell library sizes over *all* genes (not only the kept ones), as in
    ``scanpy.pp.normalize_total``. Cells with zero total stay all-zero.
    """
    counts = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    scale = np.divide(target_sum, totals, out=np.zeros(totals.shape, dtype=np.float64), where=totals > 0)
    counts.data = np.log1p(counts.data * np.repeat(scale, np.diff(counts.indptr))).astype(np.float32)
    return counts


def gene_statistics(
    path: Path, layer: str | None, scale: str, target_sum: float, chunk_size: int
) -> tuple[np.ndarray, RunningMoments]:
    """Pass 1: library sizes per cell and moments of ``expm1(log1p-normalised)`` per gene."""
    n_obs, n_vars = matrix_shape(path, layer)
    totals = np.zeros(n_obs, dtype=np.float64)
    moments = RunningMoments.empty(n_vars)
    chunks = iter_row_chunks(path, chunk_size, layer)
    for start, chunk in tqdm(chunks, total=-(-n_obs // chunk_size), desc="gene statistics", unit="chunk"):
        check_chunk_values(chunk, path, start, layer)
        if scale == "counts":
            block_totals = np.asarray(chunk.sum(axis=1), dtype=np.float64).ravel()
            totals[start : start + chunk.shape[0]] = block_totals
            logged = normalize_log1p(chunk, block_totals, target_sum)
        else:
            logged = chunk
        linear = logged.copy()
        linear.data = np.expm1(linear.data.astype(np.float64))
        moments.update(linear)
    return totals, moments


def seurat_dispersion(mean: np.ndarray, var: np.ndarray, n_bins: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(log1p mean, binned normalised dispersion) per gene, Seurat flavour.

    Genes with zero dispersion get NaN (never selected); a gene alone in its bin gets 1, as in
    scanpy. Returns the values scanpy reports as ``means`` and ``dispersions_norm``.
    """
    mean = np.where(mean == 0, 1e-12, mean)
    dispersion = var / mean
    with np.errstate(divide="ignore"):
        log_dispersion = np.where(dispersion > 0, np.log(np.where(dispersion > 0, dispersion, 1.0)), np.nan)
    log_mean = np.log1p(mean)
    frame = pd.DataFrame({"mean": log_mean, "dispersion": log_dispersion})
    frame["bin"] = pd.cut(frame["mean"], bins=n_bins)
    stats = frame.groupby("bin", observed=True)["dispersion"].agg(avg="mean", dev="std")
    single = stats["dev"].isnull()
    stats.loc[single, "dev"] = stats.loc[single, "avg"]
    stats.loc[single, "avg"] = 0.0
    per_gene = stats.loc[frame["bin"]].to_numpy(dtype=np.float64)
    normalized = (frame["dispersion"].to_numpy() - per_gene[:, 0]) / per_gene[:, 1]
    return log_mean, normalized


def top_genes(dispersion_norm: np.ndarray, n_top: int, never_expressed: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the ``n_top`` genes with the largest normalised dispersion (NaN last).

    Genes without a dispersion are never selected: those never expressed (zero in every cell) and
    those with one value in every cell. ``never_expressed`` only words the log line.
    """
    score = np.where(np.isnan(dispersion_norm), -np.inf, dispersion_norm)
    finite = int(np.isfinite(score).sum())
    if n_top > finite:
        n_never = int(np.sum(never_expressed)) if never_expressed is not None else 0
        constant = score.size - finite - n_never
        log.warning(
            "%d of the input's %d genes are never expressed (zero in every cell)%s, so %d genes vary across "
            "cells; selecting those %d instead of n_top_genes=%d (the others are written back into every "
            "prediction file, see genes.tsv)",
            n_never,
            score.size,
            f" and {constant} have one value in every cell" if constant > 0 else "",
            finite,
            finite,
            n_top,
        )
    # Stable sort on the negated score: ties resolved by input order, reproducibly.
    order = np.argsort(-score, kind="stable")[: min(n_top, finite)]
    mask = np.zeros(score.size, dtype=bool)
    mask[order] = True
    return mask


def column_selector(source_index: np.ndarray, n_source: int) -> sp.csr_matrix:
    """Sparse matrix P with ``chunk @ P`` = the chunk's columns in the order of ``source_index``.

    ``source_index[j] = -1`` makes output column j all-zero (a gene absent from the input).
    """
    present = np.flatnonzero(source_index >= 0)
    return sp.csr_matrix(
        (np.ones(present.size, dtype=np.float32), (source_index[present], present)),
        shape=(n_source, source_index.size),
    )


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def canonical_obs(
    obs: pd.DataFrame,
    perturbation_column: str,
    *,
    control_label: str,
    separator: str,
    guide_token_pattern: str | None,
    path: Path,
    perturbation_type: str = "gene",
) -> pd.DataFrame:
    """obs with ``target_gene``, ``condition_type`` and ``original_condition`` (canonical labels).

    Raises the :mod:`ccfm.data.validation` errors for a missing column, unlabelled cells, duplicated
    cell names, numbers where a gene dataset needs symbols, unparsable labels and the absence of
    control cells (suggesting a near-matching control label when there is one).
    """
    check_perturbation_column(obs, perturbation_column, path)
    check_cell_names(obs, path)
    labels = obs[perturbation_column]
    check_labels_present(labels, perturbation_column, control_label, path)
    if perturbation_type == "gene":
        check_gene_labels(labels, perturbation_column, control_label, path, list(obs.columns))
    try:
        parsed = canonicalize_labels(
            labels, control_label=control_label, separator=separator, guide_token_pattern=guide_token_pattern
        )
    except ConditionError as error:
        raise LabelParseError(
            f"{path}: obs[{perturbation_column!r}]: {error}. Fix: check 'perturbation_column' and "
            f"'combo_separator' (now {separator!r}) for this dataset in config/config.yaml."
        ) from None
    kept = obs.drop(columns=[c for c in parsed.columns if c in obs.columns])
    result = pd.concat([kept, parsed], axis=1)
    result.index = result.index.astype(str)
    check_controls(labels, result["condition_type"], perturbation_column, control_label, path)
    return result


# --------------------------------------------------------------------------------------------
# Perturbed genes: measured or not (see ccfm.data.perturbations)
# --------------------------------------------------------------------------------------------

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
    perturbed: list[str], measured: pd.Index, requested: list[str], perturbation_type: str = "gene"
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


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _write_selected(
    path: Path,
    out: Path,
    layer: str | None,
    scale: str,
    selector: sp.csr_matrix,
    totals: np.ndarray,
    target_sum: float,
    chunk_size: int,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    uns: dict[str, Any],
) -> None:
    """Pass 2: normalise and write the selected columns (and raw counts) chunk by chunk."""
    n_obs = matrix_shape(path, layer)[0]
    layers = ["counts"] if scale == "counts" else []
    with atomic_output(out) as tmp:
        with CSRH5adWriter(tmp, var, layers=layers) as writer:
            chunks = iter_row_chunks(path, chunk_size, layer)
            for start, chunk in tqdm(chunks, total=-(-n_obs // chunk_size), desc=f"writing {out.name}", unit="chunk"):
                check_chunk_values(chunk, path, start, layer)
                if scale == "counts":
                    block_totals = totals[start : start + chunk.shape[0]]
                    counts = (chunk @ selector).tocsr()
                    writer.append(normalize_log1p(counts, block_totals, target_sum), layers={"counts": counts})
                else:
                    writer.append((chunk @ selector).tocsr())
            writer.finish(obs, uns=uns)


def _validate_predict(
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


_PREPROCESS = section_defaults("preprocess")


def preprocess_dataset(
    raw: str | Path,
    out: str | Path,
    *,
    dataset: str,
    perturbation_column: str = PERT_COLUMN,
    control_label: str = CONTROL,
    combo_separator: str = COMBO_SEPARATOR,
    input_scale: str = "auto",
    n_top_genes: int = _PREPROCESS["n_top_genes"],
    target_sum: float = _PREPROCESS["target_sum"],
    chunk_size: int = CHUNK_SIZE,
    guide_token_pattern: str | None = DEFAULT_GUIDE_TOKEN,
    predict: list[str] | tuple[str, ...] = (),
    perturbation_type: str = "gene",
    perturbed_genes_tsv: str | Path | None = None,
    genes_tsv: str | Path | None = None,
) -> dict[str, Any]:
    """Write ``processed.h5ad`` from a raw h5ad (see docs/architecture.md); return a summary.

    Selected genes are the ``n_top_genes`` most dispersed plus every perturbed gene present in
    ``var_names`` plus the genes of the ``predict`` entries, kept in input order. Perturbed
    genes absent from the input stay labels: the model embeds them with rows of their own
    (:mod:`ccfm.data.perturbations`). How many perturbed genes are measured, unmeasured but perturbed
    in the cells, and unmeasured and unseen is logged and written to ``perturbed_genes_tsv``; every
    input gene with its status (modelled, never expressed, not selected) to ``genes_tsv``
    (:mod:`ccfm.data.gene_fill`), and each cell's library size to ``obs["library_size"]``.
    The input is validated first (metadata, ``predict:`` entries, then every chunk's values
    during pass 1): a :class:`ccfm.data.validation.InputValidationError` names the file, the problem
    and the fix, and no output is written.
    """
    raw, out = Path(raw), Path(out)
    check_readable_h5ad(raw)
    obs = canonical_obs(
        read_obs(raw),
        perturbation_column,
        control_label=control_label,
        separator=combo_separator,
        guide_token_pattern=guide_token_pattern,
        path=raw,
        perturbation_type=perturbation_type,
    )
    var = read_var(raw)
    var.index = var.index.astype(str)
    check_gene_names(var, raw)
    case_matched: dict[str, str] = {}
    if perturbation_type == "gene":
        obs, case_matched = relabel_case(obs, var.index, raw)
    names = perturbed_names(obs[PERT_COLUMN].astype(str).unique())
    if perturbation_type == "gene":
        check_combo_separator([n for n in names if n not in set(var.index)], names, var.index, combo_separator, raw)
    # Counted before the predict check so the log shows the counts even when it fails.
    status = perturbed_status(
        names, var.index, [g for entry in predict for g in predict_entry_genes(entry)], perturbation_type
    )
    log_perturbed_status(status, raw)
    requested = _validate_predict(
        predict, perturbation_type, var.index, obs[PERT_COLUMN], where=f"{raw}: dataset {dataset!r} 'predict:'"
    )
    warn_doubles_missing_singles(obs[PERT_COLUMN].astype(str).unique(), raw, log)
    counts_by_type = summarize_conditions(obs[PERT_COLUMN].astype(str).tolist())
    log.info("conditions: %s", counts_by_type)
    layer, scale = choose_matrix(raw, input_scale)
    log.info("%s: input scale %s (configured %s)", raw, scale, input_scale)
    totals, moments = gene_statistics(raw, layer, scale, target_sum, chunk_size)
    if scale == "counts" and np.any(totals == 0):
        log.warning("%d cells have zero counts; they stay all-zero after normalisation", int((totals == 0).sum()))
    log_mean, dispersion_norm = seurat_dispersion(moments.mean, moments.variance())
    never_expressed = moments.mean == 0
    highly_variable = top_genes(dispersion_norm, n_top_genes, never_expressed)
    perturbed = var.index.isin(names)
    absent = sorted(set(names) - set(var.index))
    if absent and perturbation_type == "gene":
        log.warning(
            "%d of %d perturbed genes are not in var_names: no expression column, embedded by learned "
            "perturbation rows of their own: %s%s",
            len(absent),
            len(names),
            ", ".join(absent[:20]),
            " ..." if len(absent) > 20 else "",
        )
    keep = np.flatnonzero(highly_variable | perturbed | var.index.isin(requested))
    out_var = var.iloc[keep].copy()
    out_var["highly_variable"] = highly_variable[keep]
    out_var["perturbed"] = perturbed[keep]
    out_var["mean_log"] = log_mean[keep]
    out_var["dispersion_norm"] = dispersion_norm[keep]
    modelled = np.zeros(var.shape[0], dtype=bool)
    modelled[keep] = True
    gene_table = gene_status_table(var.index, modelled, never_expressed)
    genes_in = gene_counts(gene_table)
    log.info("%s: %s", raw, describe_gene_counts(genes_in))
    obs = obs.copy()
    obs[LIBRARY_SIZE_COLUMN] = totals if scale == "counts" else np.nan
    summary: dict[str, Any] = {
        "dataset": dataset,
        "input_scale": scale,
        "target_sum": float(target_sum),
        "n_top_genes": int(n_top_genes),
        "n_cells": int(obs.shape[0]),
        "n_genes_input": int(var.shape[0]),
        "n_genes": int(keep.size),
        "n_highly_variable": int(highly_variable.sum()),
        "n_perturbed_in_var": int(perturbed.sum()),
        "perturbed_absent": absent,
        "perturbed_status": {name: len(genes) for name, genes in status.items()},
        "case_matched": case_matched,
        "counts_available": scale == "counts",
        "conditions": counts_by_type,
        "input_layer": layer or "X",
        "genes": genes_in,
    }
    selector = column_selector(keep, var.shape[0])
    _write_selected(raw, out, layer, scale, selector, totals, target_sum, chunk_size, obs, out_var, {"ccfm": summary})
    if perturbed_genes_tsv is not None:
        write_perturbed_status(status, perturbed_genes_tsv, case_matched)
    if genes_tsv is not None:
        write_gene_table(gene_table, genes_tsv)
    log.info("wrote %s: %d cells x %d genes", out, obs.shape[0], keep.size)
    return summary


def preprocess_target(
    target_raw: str | Path,
    processed: str | Path,
    out: str | Path,
    *,
    dataset: str,
    perturbation_column: str = PERT_COLUMN,
    control_label: str = CONTROL,
    combo_separator: str = COMBO_SEPARATOR,
    input_scale: str = "auto",
    target_sum: float = _PREPROCESS["target_sum"],
    chunk_size: int = CHUNK_SIZE,
    guide_token_pattern: str | None = DEFAULT_GUIDE_TOKEN,
    predict: list[str] | tuple[str, ...] = (),
    perturbation_type: str = "gene",
    min_shared_genes: float = 0.5,
) -> dict[str, Any]:
    """Write ``target_processed.h5ad``: the target context on exactly the genes of ``processed``.

    Genes of ``processed`` absent from the target become all-zero columns (logged); fewer than
    ``min_shared_genes`` (a fraction) of them present is an error. Library sizes are taken over
    all target genes, as for the source, then the same ``normalize_total(target_sum) + log1p``
    is applied.
    """
    target_raw, processed, out = Path(target_raw), Path(processed), Path(out)
    check_readable_h5ad(target_raw)
    obs = canonical_obs(
        read_obs(target_raw),
        perturbation_column,
        control_label=control_label,
        separator=combo_separator,
        guide_token_pattern=guide_token_pattern,
        path=target_raw,
        perturbation_type=perturbation_type,
    )
    genes = read_var(processed).index.astype(str)
    target_var = read_var(target_raw)
    # Duplicated target genes are tolerated (the first occurrence is used); Ensembl ids are not.
    check_gene_names(target_var, target_raw, allow_duplicates=True)
    check_target_gene_overlap(list(genes), target_var.index.astype(str), target_raw, processed, min_shared_genes)
    # Drugs a target may be asked for: those of the source (trained) and of the target's labels.
    # Genes: the model trains on the source cells, so an unmeasured gene is embeddable when they perturb it.
    known = pd.concat([pd.Series(read_obs_labels(processed, PERT_COLUMN)), obs[PERT_COLUMN].astype(str)])
    _validate_predict(
        predict,
        perturbation_type,
        genes,
        known,
        where=f"{processed}: target 'predict:' of dataset {dataset!r}",
        perturbed_source=pd.Series(read_obs_labels(processed, PERT_COLUMN)),
    )
    layer, scale = choose_matrix(target_raw, input_scale)
    position = pd.Series(np.arange(target_var.shape[0]), index=target_var.index.astype(str))
    if position.index.has_duplicates:
        duplicated = sorted(set(position.index[position.index.duplicated()]))
        position = position[~position.index.duplicated(keep="first")]
        log.warning(
            "%s: %d duplicated gene names (%s); the first occurrence of each is used",
            target_raw,
            len(duplicated),
            ", ".join(duplicated[:10]),
        )
    source_index = position.reindex(genes).fillna(-1).to_numpy(dtype=np.int64)
    missing = genes[source_index < 0].tolist()
    if missing:
        log.warning(
            "%d of %d genes of %s are absent from %s and are zero columns: %s%s",
            len(missing),
            len(genes),
            processed.name,
            target_raw,
            ", ".join(missing[:20]),
            " ..." if len(missing) > 20 else "",
        )
    n_obs = obs.shape[0]
    totals = np.zeros(n_obs, dtype=np.float64)
    if scale == "counts":
        for start, chunk in iter_row_chunks(target_raw, chunk_size, layer):
            check_chunk_values(chunk, target_raw, start, layer)
            totals[start : start + chunk.shape[0]] = np.asarray(chunk.sum(axis=1)).ravel()
    out_var = pd.DataFrame({"present_in_target": source_index >= 0}, index=pd.Index(genes))
    summary = {
        "dataset": dataset,
        "context": "target",
        "input_scale": scale,
        "target_sum": float(target_sum),
        "n_cells": int(n_obs),
        "n_genes": int(genes.size),
        "genes_absent": missing,
        "counts_available": scale == "counts",
        "conditions": summarize_conditions(obs[PERT_COLUMN].astype(str).tolist()),
    }
    selector = column_selector(source_index, target_var.shape[0])
    _write_selected(
        target_raw, out, layer, scale, selector, totals, target_sum, chunk_size, obs, out_var, {"ccfm": summary}
    )
    log.info("wrote %s: %d cells x %d genes (%d absent in target)", out, n_obs, genes.size, len(missing))
    return summary
