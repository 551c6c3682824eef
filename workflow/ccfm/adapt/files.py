"""The adaptation files: the shift (safetensors), its MMD table and history, and the ``adapt_mmd`` rule."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ccfm import CONTROL_LABEL
from ccfm.adapt.shift import (
    SHIFT_TENSOR_NAME,
    AdaptSettings,
    Encoder,
    ShiftResult,
    learn_shift,
    model_control_encoder,
)
from ccfm.adapt.sources import read_source_controls
from ccfm.distributed import pick_device
from ccfm.io.h5ad import CHUNK_SIZE, LabelledRows, atomic_output, read_control_cells
from ccfm.model.checkpoint import load_model

log = logging.getLogger(__name__)

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
def check_same_genes(model_genes: Sequence[str], genes: Sequence[str], what: str, model_pt: str | Path) -> None:
    if list(model_genes) != list(genes):
        raise ValueError(
            f"{what} has {len(genes)} genes that differ from the {len(model_genes)} genes {model_pt} was trained "
            "on (or their order differs); the target must be preprocessed on the genes of processed.h5ad "
            "(rule preprocess_target) and the model retrained after re-preprocessing"
        )


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
    chunk_size: int = CHUNK_SIZE,
    source_files: Sequence[str | Path] = (),
    source_options: Mapping[str, Any] | None = None,
) -> ShiftResult:
    """Learn the shift of the target controls towards the source controls and write it.

    Source controls are the ``non-targeting`` cells of ``processed.h5ad`` plus those of the
    ``source_files`` (``adapt.source_files``; :func:`ccfm.adapt.sources.read_source_controls` with
    ``source_options``), target controls those of ``target_processed.h5ad``; all are read as CSR
    in row chunks.
    """
    device = torch.device(device) if device is not None else pick_device()
    loaded = load_model(model_pt, device)
    source = read_source_controls(
        processed_h5ad,
        source_files,
        processed_control_label=control_label,
        chunk_size=chunk_size,
        **dict(source_options or {}),
    )
    target = read_control_cells(target_h5ad, control_label=control_label, chunk_size=chunk_size)
    check_same_genes(loaded.genes, source.genes, str(processed_h5ad), model_pt)
    check_same_genes(loaded.genes, target.genes, str(target_h5ad), model_pt)
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
    return learn_shift_to_files(
        encode,
        source,
        target,
        out_shift,
        out_mmd_tsv,
        out_history_tsv,
        settings,
        seed=seed,
        device=device,
        provenance={
            "encoding": encoding,
            "model": str(model_pt),
            "target": str(target_h5ad),
            "source": str(processed_h5ad),
            "source_files": [str(f) for f in source_files],
        },
    )


def learn_shift_to_files(
    encode: Encoder,
    source: LabelledRows,
    target: LabelledRows,
    out_shift: str | Path,
    out_mmd_tsv: str | Path,
    out_history_tsv: str | Path,
    settings: AdaptSettings,
    *,
    seed: int,
    device: str | torch.device,
    provenance: Mapping[str, Any],
) -> ShiftResult:
    """Learn the shift of ``target`` controls towards ``source`` controls under ``encode``; write
    the shift (with ``provenance`` and the result in its metadata), the MMD table and the history.

    Shared by every model the shift adapts to (CCFM's control encoder, State's basal encoder).
    """
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
        **provenance,
        "settings": asdict(settings),
        "mmd2_before": result.mmd_before,
        "mmd2_after": result.mmd_after,
        "best_step": result.best_step,
        "bandwidths": list(result.bandwidths),
        "n_cells": result.n_cells,
    }
    save_shift(out_shift, result.shift, target.genes, metadata)
    write_mmd_table(out_mmd_tsv, result)
    write_history(out_history_tsv, result)
    return result
