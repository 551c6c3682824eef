"""MMD shift adaptation of a trained model to a new cell context (design.md §4).

A model trained on one cell context (the *source*, e.g. K562) conditions every prediction on
encoded control cells. A new context (the *target*, e.g. H1 hESC) has differently distributed
controls. :func:`learn_shift` learns one additive offset per gene ``s`` (G,) on the target's
log1p expression so that the model's control encoding of ``max(X_tgt + s, 0)`` is distributed
like the encoding of the source controls, measured by a multi-scale RBF maximum mean
discrepancy (MMD). Predictions for the target then start from the shifted target controls.

Choices, and why:

* The shift acts on **expression**; the encoder is applied after it. The original script passed
  embeddings where expression was expected (double encoding); here the learner only ever sees
  row sources of expression and an ``encode`` callable.
* MMD estimator: the **unbiased** U-statistic of MMD² (diagonal kernel terms dropped), as in
  scDFM's training loss; it can be slightly negative when the two samples match. Bandwidths are
  the median pairwise distance × {0.5, 1, 2, 4}, with the median clamped from below (and taken
  over distinct pairs when most pairs are duplicates) so sigma never collapses.
* The bandwidths are fixed **once**, from the pooled encodings of source and *unshifted* target
  controls, and then used for training, early stopping and the reported before/after numbers: a
  kernel that followed the shift would make "before" and "after" incomparable, and a source-only
  median would be too narrow to give gradients while the target is still far away.
* ``X + s`` is clamped at 0: log1p expression is non-negative, the model never saw negative
  inputs, and the same clamped controls are what the generator later starts from. The price is
  a zero gradient for zero entries pushed below 0, which is the right semantics for
  down-regulation (a gene cannot go below "not expressed"), and zeros stay zeros, so the
  dropout atom of the two contexts still lines up. On the demo, dropping the clamp left the
  held-out MMD² almost unchanged (0.061 -> 0.053) and the shift uncorrelated with the true
  offset (0.24), against 0.061 -> 0.011 and 0.89 with it.
* Target and source controls are each split (seeded) into train / validation / test parts: the
  shift is fitted on train, early stopping watches validation, and ``mmd_before``/``mmd_after``
  are measured on test, so the reported improvement is not selected on the data it is reported
  on.
* The encoding matched is the model's per-gene control stream (``encoding: tokens``), not its
  gene-pooled summary; see :func:`model_control_encoder` for why and the demo numbers.
* Memory stays flat in the number of cells: controls are kept as CSR and densified one
  mini-batch at a time (:class:`CSRRowSource`), encodings exist one batch at a time, and the
  held-out MMD is the mean of unbiased estimates over fixed disjoint blocks (still unbiased).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import Tensor
from tqdm import tqdm

from ccfm import COMBO_SEPARATOR, CONTROL_LABEL, PERT_COLUMN
from ccfm.config import section_defaults, settings_from
from ccfm.data.conditions import parse_condition
from ccfm.data.perturbations import PerturbationVocab
from ccfm.data.validation import check_enough_perturbations
from ccfm.distributed import pick_device
from ccfm.evaluate.baselines import condition_means, predict_baseline
from ccfm.evaluate.celleval import run_cell_eval
from ccfm.evaluate.metrics import compact_metrics
from ccfm.io.h5ad import atomic_output, read_control_cells, read_obs, read_rows_with_labels
from ccfm.io.predictions import build_prediction_anndata, read_expression_h5ad, write_predictions, write_table_atomic
from ccfm.model.checkpoint import LoadedModel, load_model
from ccfm.model.expression import ExpressionData
from ccfm.model.generation import GenerateSettings, GenerationSetup, controls_mean, predict_label
from ccfm.model.mmd import BANDWIDTH_SCALES, bandwidths_from_median, flatten, median_distance, mmd2_unbiased
from ccfm.model.model import CascadedFlowModel

log = logging.getLogger(__name__)

Encoder = Callable[[Tensor], Tensor]
"""Maps a dense expression batch (B, G) to encodings (B, ...); must be differentiable in its input."""

SHIFT_TENSOR_NAME = "shift"
ENCODINGS = ("pooled", "tokens")


# --------------------------------------------------------------------------------------------
# Row sources: sparse-aware mini-batch reading
# --------------------------------------------------------------------------------------------


@runtime_checkable
class RowSource(Protocol):
    """Anything that can hand out dense row batches of a (n_cells, n_genes) matrix."""

    @property
    def shape(self) -> tuple[int, int]: ...

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Dense float32 array (len(rows), n_genes) of the requested rows, in the given order."""
        ...


class CSRRowSource:
    """Row batches of a CSR matrix, densified one batch at a time.

    Reads ``indptr``/``indices``/``data`` directly instead of calling ``toarray`` on a row
    slice, so no code path can densify the whole matrix by accident.
    """

    def __init__(self, matrix: sp.csr_matrix | sp.csr_array) -> None:
        if not sp.issparse(matrix) or matrix.format != "csr":
            raise TypeError(f"CSRRowSource needs a CSR matrix, got {type(matrix).__name__}")
        if not matrix.has_canonical_format:
            # Duplicate entries would be overwritten, not summed, by the scatter below.
            matrix = matrix.copy()
            matrix.sum_duplicates()
        self._indptr = np.asarray(matrix.indptr)
        self._indices = np.asarray(matrix.indices)
        self._data = np.asarray(matrix.data)
        self._shape = (int(matrix.shape[0]), int(matrix.shape[1]))

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        starts = self._indptr[rows]
        lengths = self._indptr[rows + 1] - starts
        out = np.zeros((len(rows), self._shape[1]), dtype=np.float32)
        total = int(lengths.sum())
        if total == 0:
            return out
        # Position of every stored entry of the requested rows, without a Python loop.
        offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        positions = np.arange(total, dtype=np.int64) + offsets
        out_rows = np.repeat(np.arange(len(rows)), lengths)
        out[out_rows, self._indices[positions]] = self._data[positions]
        return out


class DenseRowSource:
    """Row batches of an in-memory dense array (small data and tests)."""

    def __init__(self, matrix: np.ndarray) -> None:
        if matrix.ndim != 2:
            raise ValueError(f"expected a 2-d expression matrix, got shape {matrix.shape}")
        self._matrix = matrix

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self._matrix.shape[0]), int(self._matrix.shape[1]))

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self._matrix[np.asarray(rows, dtype=np.int64)], dtype=np.float32)


def as_row_source(data: RowSource | sp.spmatrix | sp.sparray | np.ndarray) -> RowSource:
    """Wrap a CSR matrix, dense array or existing row source; other sparse formats become CSR."""
    if isinstance(data, (CSRRowSource, DenseRowSource)):
        return data
    if sp.issparse(data):
        return CSRRowSource(data if data.format == "csr" else data.tocsr())
    if isinstance(data, np.ndarray):
        return DenseRowSource(data)
    if isinstance(data, RowSource):
        return data
    raise TypeError(f"expected a scipy CSR matrix, a numpy array or a RowSource, got {type(data).__name__}")


# --------------------------------------------------------------------------------------------
# Learning the shift
# --------------------------------------------------------------------------------------------


_ADAPT = section_defaults("adapt")


@dataclass(frozen=True)
class AdaptSettings:
    """Hyper-parameters of :func:`learn_shift` (config section ``adapt``)."""

    steps: int = _ADAPT["steps"]
    lr: float = _ADAPT["lr"]
    batch_size: int = _ADAPT["batch_size"]
    holdout_fraction: float = _ADAPT["holdout_fraction"]
    patience: int = _ADAPT["patience"]
    eval_every: int = _ADAPT["eval_every"]
    eval_cells: int = _ADAPT["eval_cells"]
    encoding: str = _ADAPT["encoding"]  # see model_control_encoder

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"adapt.encoding {self.encoding!r} is unknown: use one of {ENCODINGS}")

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> AdaptSettings:
        return settings_from(cls, "adapt", values)


@dataclass
class ShiftResult:
    """Outcome of :func:`learn_shift`.

    ``mmd_before``/``mmd_after`` are unbiased MMD² between the encoded *test* part of the target
    controls (unshifted / shifted by the returned ``shift``) and the test part of the source
    controls; ``history`` has one row per evaluation (step, train MMD² of the last batch,
    validation MMD²).
    """

    shift: Tensor
    history: list[dict[str, float]]
    mmd_before: float
    mmd_after: float
    val_mmd_before: float
    val_mmd_after: float
    best_step: int
    steps_run: int
    bandwidths: tuple[float, ...]
    n_cells: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Partition:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _partition_rows(n_rows: int, holdout_fraction: float, rng: np.random.Generator, what: str) -> _Partition:
    """Seeded split into train / validation / test (the held-out fraction halved)."""
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    n_holdout = int(round(n_rows * holdout_fraction))
    n_val = n_holdout // 2
    n_test = n_holdout - n_val
    n_train = n_rows - n_holdout
    if min(n_val, n_test, n_train) < 2:
        raise ValueError(
            f"{what}: {n_rows} control cells are too few to split into train/validation/test with "
            f"holdout_fraction={holdout_fraction} (each part needs >= 2 cells)"
        )
    order = rng.permutation(n_rows)
    return _Partition(train=order[:n_train], val=order[n_train : n_train + n_val], test=order[n_train + n_val :])


def _eval_blocks(rows: np.ndarray, max_cells: int, block_size: int) -> list[np.ndarray]:
    """Fixed disjoint blocks of at most ``block_size`` (and ≥ 2) rows covering up to ``max_cells`` of ``rows``."""
    rows = rows[:max_cells]
    n_blocks = max(1, math.ceil(len(rows) / block_size))
    return [block for block in np.array_split(rows, n_blocks) if len(block) >= 2]


def _shifted(batch: Tensor, shift: Tensor) -> Tensor:
    return (batch + shift).clamp_min(0.0)


def apply_shift(expression: np.ndarray, shift: np.ndarray | Tensor) -> np.ndarray:
    """Shifted log1p expression ``max(X + s, 0)`` of a dense batch (n, G), as float32."""
    shift_np = shift.detach().cpu().numpy() if isinstance(shift, Tensor) else np.asarray(shift)
    if expression.shape[-1] != shift_np.shape[-1]:
        raise ValueError(f"shift has {shift_np.shape[-1]} genes, expression has {expression.shape[-1]}")
    return np.maximum(expression + shift_np, 0.0).astype(np.float32, copy=False)


class _Batcher:
    """Moves dense row batches of a row source to the training device."""

    def __init__(self, source: RowSource, device: torch.device) -> None:
        self.source = source
        self.device = device

    def __call__(self, rows: np.ndarray) -> Tensor:
        return torch.from_numpy(self.source.read_rows(rows)).to(self.device)


@torch.no_grad()
def _block_mmd(
    encode: Encoder,
    target: _Batcher,
    source: _Batcher,
    target_blocks: list[np.ndarray],
    source_blocks: list[np.ndarray],
    shift: Tensor,
    sigmas: Sequence[float],
) -> float:
    """Mean unbiased MMD² over paired fixed blocks (shifted target vs source)."""
    n_pairs = min(len(target_blocks), len(source_blocks))
    values = [
        float(mmd2_unbiased(encode(_shifted(target(t_rows), shift)), encode(source(s_rows)), sigmas))
        for t_rows, s_rows in zip(target_blocks[:n_pairs], source_blocks[:n_pairs])
    ]
    return float(np.mean(values))


@torch.no_grad()
def _initial_bandwidths(
    encode: Encoder, target: _Batcher, source: _Batcher, target_rows: np.ndarray, source_rows: np.ndarray
) -> tuple[float, ...]:
    """Bandwidths from the pooled encodings of one batch of source and unshifted target cells."""
    pooled = torch.cat([flatten(encode(target(target_rows))), flatten(encode(source(source_rows)))])
    return tuple(float(sigma) for sigma in bandwidths_from_median(median_distance(pooled.double())))


class _EarlyStopping:
    """Keeps the shift with the lowest validation MMD² and says when to stop looking."""

    def __init__(self, initial_value: float, initial_shift: Tensor, patience: int) -> None:
        self.best_value, self.best_step, self.best_shift = initial_value, 0, initial_shift.clone()
        self.patience = patience
        self.evals_without_improvement = 0

    def update(self, value: float, step: int, shift: Tensor) -> bool:
        """Record one evaluation; True when ``patience`` evaluations in a row did not improve."""
        if value < self.best_value:
            self.best_value, self.best_step, self.best_shift = value, step, shift.detach().clone()
            self.evals_without_improvement = 0
            return False
        self.evals_without_improvement += 1
        return self.evals_without_improvement >= self.patience


def _check_gene_counts(target: RowSource, source: RowSource) -> int:
    n_genes = target.shape[1]
    if source.shape[1] != n_genes:
        raise ValueError(
            f"target controls have {n_genes} genes but source controls have {source.shape[1]}; "
            "both must be on the same genes in the same order (target_processed.h5ad is built "
            "on the genes of processed.h5ad)"
        )
    return n_genes


def learn_shift(
    encode: Encoder,
    target_controls: RowSource | sp.spmatrix | sp.sparray | np.ndarray,
    source_controls: RowSource | sp.spmatrix | sp.sparray | np.ndarray,
    *,
    steps: int = 1000,
    lr: float = 0.02,
    batch_size: int = 128,
    seed: int = 0,
    holdout_fraction: float = 0.2,
    patience: int = 10,
    eval_every: int = 25,
    eval_cells: int = 1024,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ShiftResult:
    """Learn a per-gene additive shift of target log1p expression that MMD-matches the source.

    Minimises ``MMD²(encode(max(X_tgt + s, 0)), encode(X_src))`` over ``s`` (G,) with Adam on
    seeded mini-batches of ``batch_size`` cells per side. Every ``eval_every`` steps the MMD² on
    the validation controls is computed; the best shift is kept and training stops after
    ``patience`` evaluations without improvement. ``encode`` must be deterministic (eval mode).
    """
    if steps < 1 or batch_size < 2 or eval_every < 1 or patience < 1:
        raise ValueError("steps, eval_every and patience must be >= 1 and batch_size >= 2")
    device = torch.device(device)
    target_source, source_source = as_row_source(target_controls), as_row_source(source_controls)
    n_genes = _check_gene_counts(target_source, source_source)
    rng = np.random.default_rng(seed)
    target_parts = _partition_rows(target_source.shape[0], holdout_fraction, rng, "target controls")
    source_parts = _partition_rows(source_source.shape[0], holdout_fraction, rng, "source controls")
    target, source = _Batcher(target_source, device), _Batcher(source_source, device)

    def draw(rows: np.ndarray) -> np.ndarray:
        # Without replacement within a batch when possible: duplicates add nothing to an MMD.
        return rng.choice(rows, size=min(batch_size, len(rows)), replace=False)

    sigmas = _initial_bandwidths(encode, target, source, draw(target_parts.train), draw(source_parts.train))
    log.info("MMD bandwidths (pooled median x %s): %s", BANDWIDTH_SCALES, [f"{s:.4g}" for s in sigmas])
    val_blocks = (
        _eval_blocks(target_parts.val, eval_cells, batch_size),
        _eval_blocks(source_parts.val, eval_cells, batch_size),
    )
    test_blocks = (
        _eval_blocks(target_parts.test, eval_cells, batch_size),
        _eval_blocks(source_parts.test, eval_cells, batch_size),
    )

    shift = torch.zeros(n_genes, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([shift], lr=lr)
    zero = torch.zeros(n_genes, device=device)
    mmd_before = _block_mmd(encode, target, source, *test_blocks, zero, sigmas)
    val_before = _block_mmd(encode, target, source, *val_blocks, zero, sigmas)
    history: list[dict[str, float]] = [{"step": 0, "train_mmd": float("nan"), "val_mmd": val_before}]
    # Step 0 (no shift) is a candidate too: a shift that never beats it is not kept.
    stopper, step = _EarlyStopping(val_before, zero, patience), 0

    for step in tqdm(range(1, steps + 1), desc="adapt shift", disable=not progress, mininterval=5):
        x_target = target(draw(target_parts.train))
        with torch.no_grad():
            z_source = encode(source(draw(source_parts.train)))
        loss = mmd2_unbiased(encode(_shifted(x_target, shift)), z_source, sigmas)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % eval_every != 0 and step != steps:
            continue
        val = _block_mmd(encode, target, source, *val_blocks, shift.detach(), sigmas)
        history.append({"step": step, "train_mmd": float(loss.detach()), "val_mmd": val})
        if stopper.update(val, step, shift):
            log.info("early stop at step %d: no validation improvement in %d evaluations", step, patience)
            break

    mmd_after = _block_mmd(encode, target, source, *test_blocks, stopper.best_shift, sigmas)
    log.info(
        "held-out (test) MMD²: before %.5g, after %.5g (best step %d of %d run)",
        mmd_before,
        mmd_after,
        stopper.best_step,
        step,
    )
    return ShiftResult(
        shift=stopper.best_shift.cpu(),
        history=history,
        mmd_before=mmd_before,
        mmd_after=mmd_after,
        val_mmd_before=val_before,
        val_mmd_after=stopper.best_value,
        best_step=stopper.best_step,
        steps_run=step,
        bandwidths=tuple(sigmas),
        n_cells={
            "target_train": len(target_parts.train),
            "target_val": len(target_parts.val),
            "target_test": len(target_parts.test),
            "source_train": len(source_parts.train),
            "source_val": len(source_parts.val),
            "source_test": len(source_parts.test),
        },
    )


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def save_shift(path: str | Path, shift: Tensor, genes: Sequence[str], metadata: dict[str, Any] | None = None) -> None:
    """Write the shift as safetensors (tensor ``shift``) with gene order and metadata as JSON."""
    from safetensors.torch import save_file

    genes = [str(g) for g in genes]
    if shift.ndim != 1 or shift.shape[0] != len(genes):
        raise ValueError(f"shift of shape {tuple(shift.shape)} does not match {len(genes)} genes")
    header = {"genes": json.dumps(genes), "metadata": json.dumps(metadata or {})}
    with atomic_output(path) as tmp:
        save_file({SHIFT_TENSOR_NAME: shift.detach().cpu().float().contiguous()}, str(tmp), metadata=header)
        # safetensors creates the file owner-only (0600); give it the usual permissions.
        os.chmod(tmp, 0o666 & ~_current_umask())


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_shift(path: str | Path) -> tuple[Tensor, list[str], dict[str, Any]]:
    """Read a shift written by :func:`save_shift`: (shift (G,), gene order, metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
        if SHIFT_TENSOR_NAME not in handle.keys() or "genes" not in header:
            raise ValueError(f"{path} is not a shift file written by ccfm.adapt.shift.save_shift")
        shift = handle.get_tensor(SHIFT_TENSOR_NAME)
    genes = json.loads(header["genes"])
    return shift, genes, json.loads(header.get("metadata", "{}"))


def align_shift(shift: Tensor, shift_genes: Sequence[str], genes: Sequence[str]) -> Tensor:
    """Reorder a saved shift to ``genes``; every requested gene must have a shift."""
    position = {gene: i for i, gene in enumerate(shift_genes)}
    missing = [g for g in genes if g not in position]
    if missing:
        raise ValueError(f"the shift has no value for {len(missing)} gene(s), e.g. {missing[:5]}")
    return shift[torch.as_tensor([position[g] for g in genes], dtype=torch.long)]


def write_tsv_atomic(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Small tab-separated table, written to a temp file and renamed into place."""
    with atomic_output(path) as tmp, open(tmp, "w") as handle:
        handle.write("\t".join(header) + "\n")
        for row in rows:
            handle.write("\t".join(_format_cell(v) for v in row) + "\n")


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_mmd_table(path: str | Path, result: ShiftResult) -> None:
    """``mmd.tsv``: held-out MMD² before/after adaptation, one row per held-out part."""
    rows = []
    for part, before, after, n_t, n_s in (
        ("test", result.mmd_before, result.mmd_after, result.n_cells["target_test"], result.n_cells["source_test"]),
        (
            "validation",
            result.val_mmd_before,
            result.val_mmd_after,
            result.n_cells["target_val"],
            result.n_cells["source_val"],
        ),
    ):
        rows.append([part, before, after, after - before, n_t, n_s, result.best_step, result.steps_run])
    write_tsv_atomic(
        path,
        [
            "heldout_part",
            "mmd2_before",
            "mmd2_after",
            "change",
            "n_target_cells",
            "n_source_cells",
            "best_step",
            "steps_run",
        ],
        rows,
    )


def write_history(path: str | Path, result: ShiftResult) -> None:
    """``history.tsv``: step, last training-batch MMD², validation MMD²."""
    write_tsv_atomic(
        path, ["step", "train_mmd2", "val_mmd2"], [[h["step"], h["train_mmd"], h["val_mmd"]] for h in result.history]
    )


# --------------------------------------------------------------------------------------------
def _check_same_genes(model_genes: Sequence[str], genes: Sequence[str], what: str, model_pt: str | Path) -> None:
    if list(model_genes) != list(genes):
        raise ValueError(
            f"{what} has {len(genes)} genes that differ from the {len(model_genes)} genes {model_pt} was trained "
            "on (or their order differs); the target must be preprocessed on the genes of processed.h5ad "
            "(rule preprocess_target) and the model retrained after re-preprocessing"
        )


# --------------------------------------------------------------------------------------------
# The model's control encoder
# --------------------------------------------------------------------------------------------


def model_control_encoder(
    model: CascadedFlowModel, *, encoding: str = "tokens", gene_ids: Tensor | None = None
) -> Encoder:
    """The control-cell encoding CCFM conditions on, as a plain ``(B, G) -> (B, ...)`` callable.

    ``encoding="tokens"`` (default) is the full control stream (B, G, d) of
    :meth:`CascadedFlowModel.control_stream`, exactly what the backbone cross-attends to; it
    keeps one token per gene, so a per-gene shift is identifiable gene by gene.
    ``"pooled"`` is :meth:`CascadedFlowModel.encode_control` (B, d), its mean over genes: a
    d-vector of G genes constrains only d directions, so a shift can reach MMD ≈ 0 there without
    matching the true per-gene offset.
    ``gene_ids`` (G,) defaults to ``0..G-1``: the target is on the model's genes, in order.
    The model is put in eval mode and frozen: only the shift is learned.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"adapt encoding {encoding!r} is unknown: use one of {ENCODINGS}")
    model.eval()
    model.requires_grad_(False)

    def encode(expression: Tensor) -> Tensor:
        ids = gene_ids if gene_ids is not None else torch.arange(expression.shape[1], device=expression.device)
        ids = ids.to(expression.device).expand(expression.shape[0], -1)
        if encoding == "pooled":
            return model.encode_control(ids, expression)
        return model.control_stream(ids, expression)[1]

    return encode


# --------------------------------------------------------------------------------------------
# Rule entry point 1: learn the shift
# --------------------------------------------------------------------------------------------


def adapt_to_files(
    model_pt: str | Path,
    processed_h5ad: str | Path,
    target_h5ad: str | Path,
    out_shift: str | Path,
    out_mmd_tsv: str | Path,
    out_history_tsv: str | Path,
    settings: AdaptSettings,
    *,
    seed: int,
    device: str | torch.device | None = None,
    control_label: str = CONTROL_LABEL,
    chunk_size: int = 10000,
) -> ShiftResult:
    """Learn the shift of the target controls towards the source controls and write it.

    Source controls are the ``non-targeting`` cells of ``processed.h5ad``, target controls those
    of ``target_processed.h5ad``; both are read as CSR in row chunks.
    """
    device = torch.device(device) if device is not None else pick_device()
    loaded = load_model(model_pt, device)
    source = read_control_cells(processed_h5ad, control_label=control_label, chunk_size=chunk_size)
    target = read_control_cells(target_h5ad, control_label=control_label, chunk_size=chunk_size)
    _check_same_genes(loaded.genes, source.genes, str(processed_h5ad), model_pt)
    _check_same_genes(loaded.genes, target.genes, str(target_h5ad), model_pt)
    encoding = settings.encoding
    log.info(
        "adapting %d target controls to %d source controls over %d genes (encoding %s, device %s)",
        target.matrix.shape[0],
        source.matrix.shape[0],
        len(target.genes),
        encoding,
        device,
    )
    encode = model_control_encoder(loaded.denoiser.model, encoding=encoding)
    result = learn_shift(
        encode,
        target.matrix,
        source.matrix,
        seed=seed,
        device=device,
        steps=settings.steps,
        lr=settings.lr,
        batch_size=settings.batch_size,
        holdout_fraction=settings.holdout_fraction,
        patience=settings.patience,
        eval_every=settings.eval_every,
        eval_cells=settings.eval_cells,
    )
    metadata = {
        "seed": seed,
        "encoding": encoding,
        "settings": asdict(settings),
        "mmd2_before": result.mmd_before,
        "mmd2_after": result.mmd_after,
        "best_step": result.best_step,
        "bandwidths": list(result.bandwidths),
        "n_cells": result.n_cells,
        "model": str(model_pt),
        "target": str(target_h5ad),
        "source": str(processed_h5ad),
    }
    save_shift(out_shift, result.shift, target.genes, metadata)
    write_mmd_table(out_mmd_tsv, result)
    write_history(out_history_tsv, result)
    return result


# --------------------------------------------------------------------------------------------
# Rule entry point 2: predict target perturbations from shifted (and unshifted) controls
# --------------------------------------------------------------------------------------------


@dataclass
class ShiftedExpression(ExpressionData):
    """Control cells whose dense batches come out shifted, ``max(X + s, 0)``.

    Handed to :func:`ccfm.model.generation.predict_label` in place of the source data, so the model
    engineer's sampler runs unchanged on the adapted target controls.
    """

    shift: np.ndarray | None = None

    def dense_rows(self, rows: np.ndarray) -> np.ndarray:
        dense = super().dense_rows(rows)
        return dense if self.shift is None else apply_shift(dense, self.shift)


def target_labels_to_predict(
    observed: Sequence[str], requested: Sequence[str], vocab: PerturbationVocab, control_label: str = CONTROL_LABEL
) -> list[str]:
    """The target perturbations to predict.

    ``requested`` (the dataset's ``target.predict`` list) wins and every entry must be
    embeddable by the model (a clear error otherwise). Without it, every observed target
    perturbation is predicted, except those naming a gene outside the model's gene list: those are
    skipped with a warning, since the model cannot embed them.
    """
    if requested:
        labels = list(dict.fromkeys(parse_condition(str(r), control_label=control_label).canonical for r in requested))
        if CONTROL_LABEL in labels:
            raise ValueError("target.predict lists the control label; list perturbations only")
        for label in labels:
            vocab.ids(label)
        return labels
    labels, skipped = [], []
    for label in sorted(set(map(str, observed)) - {control_label, CONTROL_LABEL}):
        try:
            vocab.ids(label)
        except KeyError:
            skipped.append(label)
            continue
        labels.append(label)
    if skipped:
        log.warning(
            "%d observed target perturbation(s) name genes the model cannot embed and are not predicted: %s",
            len(skipped),
            skipped[:20],
        )
    if not labels:
        raise ValueError(
            "no target perturbation to predict: the target data has none the model can embed and the "
            "dataset's target.predict list is empty"
        )
    return labels


def predict_target_cells(
    model: LoadedModel,
    controls: sp.csr_matrix,
    labels: Sequence[str],
    settings: GenerateSettings,
    *,
    seed: int,
    device: torch.device,
    shift: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """Generate cells for every label from the (shifted) target controls with the cascaded sampler.

    Source cells and noise are seeded per label (:func:`ccfm.model.generation.label_seed`), so the
    adapted and unadapted predictions start from the same cells and the same noise: they differ
    only by the shift.
    """
    data = ShiftedExpression(controls, list(model.genes), np.full(controls.shape[0], CONTROL_LABEL), shift=shift)
    control_rows = np.arange(controls.shape[0])
    what = "adapted" if shift is not None else "unadapted"
    # An anchored model centres its cells on the context's own (unshifted) control mean + its
    # predicted shift: the MMD shift only changes what the flow sees, not the context the
    # prediction is for (centring on the shifted controls would move the prediction back into
    # the source context).
    raw = ShiftedExpression(controls, list(model.genes), np.full(controls.shape[0], CONTROL_LABEL), shift=None)
    reference = controls_mean(raw, control_rows)
    return {
        label: predict_label(model, data, control_rows, label, settings, seed, device, reference)
        for label in tqdm(labels, desc=f"predict target ({what})", mininterval=5)
    }


def predict_target_to_files(
    generation: GenerationSetup,
    target_h5ad: str | Path,
    shift_path: str | Path,
    out_pred: str | Path,
    out_means: str | Path,
    out_pred_unadapted: str | Path,
    out_means_unadapted: str | Path,
    *,
    requested: Sequence[str] = (),
    seed: int,
    control_label: str = CONTROL_LABEL,
    chunk_size: int = 10000,
) -> list[str]:
    """Predict the target perturbations with and without the learned shift; write both files.

    Both prediction files carry the real (unshifted) target controls under ``non-targeting``:
    cell-eval's deltas must be relative to the real target context. Returns the labels.
    """
    model = generation.model
    controls = read_control_cells(target_h5ad, control_label=control_label, chunk_size=chunk_size)
    _check_same_genes(model.genes, controls.genes, str(target_h5ad), generation.model_pt)
    shift, shift_genes, _ = load_shift(shift_path)
    shift_np = align_shift(shift, shift_genes, controls.genes).numpy()
    observed = read_obs(target_h5ad)[PERT_COLUMN].astype(str).unique()
    labels = target_labels_to_predict(observed, requested, model.vocab, control_label)
    log.info("predicting %d target perturbation(s) from %d target controls", len(labels), controls.matrix.shape[0])
    for shift_or_none, pred_path, means_path in (
        (shift_np, out_pred, out_means),
        (None, out_pred_unadapted, out_means_unadapted),
    ):
        predicted = predict_target_cells(
            model,
            controls.matrix,
            labels,
            generation.settings,
            seed=seed,
            device=generation.device,
            shift=shift_or_none,
        )
        write_predictions(pred_path, means_path, controls.genes, predicted, controls.matrix, CONTROL_LABEL)
    return labels


# --------------------------------------------------------------------------------------------
# Rule entry point 3: score target predictions beside target-control baselines
# --------------------------------------------------------------------------------------------

TARGET_METHODS = ("ccfm_adapted", "ccfm_unadapted", "nochange", "additive")


def target_baselines(
    processed_h5ad: str | Path,
    controls: sp.csr_matrix,
    genes: Sequence[str],
    labels: Sequence[str],
    *,
    n_cells: int,
    seed: int,
    chunk_size: int = 10000,
) -> dict[str, dict[str, np.ndarray]]:
    """``nochange`` and ``additive`` predictions built from the *target* controls.

    ``additive`` moves the target controls by the sum of the source single-perturbation deltas
    (means from ``processed.h5ad``): the context-transfer baseline that needs no model at all.
    """
    singles = sorted({part for label in labels for part in label.split(COMBO_SEPARATOR)})
    source_labels = set(read_obs(processed_h5ad)[PERT_COLUMN].astype(str))
    available = [s for s in singles if s in source_labels]
    means = condition_means(processed_h5ad, [CONTROL_LABEL, *available], chunk_size=chunk_size)
    if means.genes != list(genes):
        raise ValueError(f"{processed_h5ad} genes differ from the target's; rerun preprocess_target")
    return {
        method: predict_baseline(method, list(labels), means, available, controls, n_cells, seed).predicted
        for method in ("nochange", "additive")
    }


def _real_target_anndata(target_h5ad: str | Path, labels: Sequence[str], chunk_size: int) -> ad.AnnData:
    """Target controls plus the cells of ``labels``, read in row chunks (other cells never loaded)."""
    rows = read_rows_with_labels(
        target_h5ad, lambda found: np.isin(found, [*labels, CONTROL_LABEL]), chunk_size=chunk_size
    )
    return ad.AnnData(
        X=rows.matrix,
        obs=pd.DataFrame({PERT_COLUMN: pd.Categorical(rows.labels)}, index=pd.Index(rows.cell_names, dtype=str)),
        var=pd.DataFrame(index=pd.Index(rows.genes, dtype=str)),
    )


def _restrict(pred: ad.AnnData, labels: Sequence[str]) -> ad.AnnData:
    keep = pred.obs[PERT_COLUMN].astype(str).isin([*labels, CONTROL_LABEL]).to_numpy()
    pred = pred[keep].copy()
    pred.obs[PERT_COLUMN] = pred.obs[PERT_COLUMN].astype(str).astype("category")
    return pred


def score_target_to_files(
    target_h5ad: str | Path,
    processed_h5ad: str | Path,
    pred_adapted: str | Path,
    pred_unadapted: str | Path,
    out_metrics_tsv: str | Path,
    out_summary_tsv: str | Path,
    *,
    n_cells: int,
    seed: int,
    top_de: int = 20,
    cell_eval_profile: str | None = "full",
    num_threads: int = 1,
    chunk_size: int = 10000,
) -> pd.DataFrame:
    """Score adapted and unadapted predictions beside the target-control baselines.

    Methods (:data:`TARGET_METHODS`): CCFM from shifted controls, CCFM from unshifted controls,
    and the ``nochange``/``additive`` baselines built from the target controls. Scored on the
    target perturbations that were both predicted and observed, against the real target cells
    (controls + those perturbations, read in row chunks). Writes the compact metrics per
    perturbation (``method`` column) and a per-method summary: the compact means plus, with
    ``cell_eval_profile``, cell-eval's aggregate means (columns prefixed ``celleval_``).
    """
    predicted = read_expression_h5ad(pred_adapted)
    labels = sorted(set(predicted.obs[PERT_COLUMN].astype(str)) - {CONTROL_LABEL})
    real = _real_target_anndata(target_h5ad, labels, chunk_size)
    scored = sorted(set(real.obs[PERT_COLUMN].astype(str)) - {CONTROL_LABEL})
    if not scored:
        raise ValueError(f"{target_h5ad}: none of the predicted target perturbations was observed; nothing to score")
    unscored = sorted(set(labels) - set(scored))
    if unscored:
        log.info(
            "%d predicted target perturbation(s) have no observed cells and are not scored: %s",
            len(unscored),
            unscored[:10],
        )
    if cell_eval_profile:
        # before any scoring: cell-eval would otherwise fail in its last metrics, after the others
        check_enough_perturbations(len(scored), cell_eval_profile, str(target_h5ad), target=True)
    genes = [str(g) for g in real.var_names]
    controls = real.X[np.flatnonzero(real.obs[PERT_COLUMN].astype(str).to_numpy() == CONTROL_LABEL)]
    predictions = {"ccfm_adapted": predicted, "ccfm_unadapted": read_expression_h5ad(pred_unadapted)}
    for method, cells in target_baselines(
        processed_h5ad, controls, genes, scored, n_cells=n_cells, seed=seed, chunk_size=chunk_size
    ).items():
        predictions[method] = build_prediction_anndata(genes, cells, controls)
    frames, summaries = [], []
    for method, pred in predictions.items():
        pred = _restrict(pred, scored)
        frame = compact_metrics(pred, real, CONTROL_LABEL, top_de, seed=seed)
        frame.insert(0, "method", method)
        frames.append(frame)
        summary = frame.drop(columns=["method", "perturbation"]).mean().to_frame().T
        if cell_eval_profile:
            _, aggregate = run_cell_eval(pred, real, CONTROL_LABEL, cell_eval_profile, num_threads)
            summary = pd.concat([summary, _celleval_means(aggregate)], axis=1)
        summary.insert(0, "method", method)
        summaries.append(summary)
    metrics = pd.concat(frames, ignore_index=True)
    summary = pd.concat(summaries, ignore_index=True)
    summary.insert(1, "n_perturbations", len(scored))
    write_table_atomic(metrics, out_metrics_tsv, sep="\t", index=False)
    write_table_atomic(summary, out_summary_tsv, sep="\t", index=False)
    log.info("target scores (mean over %d perturbations):\n%s", len(scored), summary.to_string(index=False))
    return summary


def _celleval_means(aggregate: pd.DataFrame) -> pd.DataFrame:
    """One row of cell-eval's per-metric means (its aggregate table has a ``statistic`` column)."""
    if "statistic" in aggregate.columns:
        row = aggregate.set_index("statistic").loc[["mean"]].reset_index(drop=True)
    else:
        row = aggregate.mean(numeric_only=True).to_frame().T
    return row.add_prefix("celleval_").reset_index(drop=True)
