"""The adaptation files: the shift (safetensors), its MMD table and history; rules ``adapt_mmd``/``adapt_state``."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ccfm.adapt.adaptable import AdaptableModel
from ccfm.adapt.shift import SHIFT_TENSOR_NAME, AdaptSettings, ShiftResult, learn_shift
from ccfm.adapt.sources import read_source_controls
from ccfm.io.atomic import atomic_output
from ccfm.io.h5ad import read_control_cells

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
# Rule entry point 1 (adapt_mmd, adapt_state): learn the shift
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaptInputs:
    """What the shift is learned from: the source controls of ``processed_h5ad`` plus those of
    ``source_files`` (``adapt.source_files``, read with ``source_options``:
    :func:`ccfm.adapt.sources.read_source_controls`), and the controls of ``target_h5ad``."""

    processed_h5ad: str | Path
    target_h5ad: str | Path
    source_files: Sequence[str | Path] = ()
    source_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ShiftFiles:
    """The adapter's outputs: the shift (safetensors), its MMD table and its history."""

    shift: str | Path
    mmd_tsv: str | Path
    history_tsv: str | Path


def adapt_to_files(
    model: AdaptableModel, inputs: AdaptInputs, outputs: ShiftFiles, settings: AdaptSettings, *, seed: int
) -> ShiftResult:
    """Learn the shift of the target controls towards the source controls through ``model``'s control
    encoder and write it (all controls are read as CSR in row chunks)."""
    source = read_source_controls(inputs.processed_h5ad, inputs.source_files, **dict(inputs.source_options))
    target = read_control_cells(inputs.target_h5ad)
    model.check_genes(source.genes, str(inputs.processed_h5ad))
    model.check_genes(target.genes, str(inputs.target_h5ad))
    encoder = model.encoder_provenance(settings)
    log.info(
        "adapting %d target controls to %d source controls over %d genes through %s (device %s)",
        target.matrix.shape[0],
        source.matrix.shape[0],
        len(target.genes),
        encoder,
        model.device,
    )
    encode = model.control_encoder(settings)
    result = learn_shift(encode, target.matrix, source.matrix, settings, seed=seed, device=model.device)
    metadata = {
        "seed": seed,
        **encoder,
        "target": str(inputs.target_h5ad),
        "source": str(inputs.processed_h5ad),
        "source_files": [str(f) for f in inputs.source_files],
        "settings": asdict(settings),
    }
    write_shift_files(outputs, result, target.genes, metadata)
    return result


def write_shift_files(
    outputs: ShiftFiles, result: ShiftResult, genes: Sequence[str], metadata: Mapping[str, Any]
) -> None:
    """The shift (``metadata`` plus the result's numbers in its header), the MMD table and the history."""
    save_shift(
        outputs.shift,
        result.shift,
        genes,
        {
            **metadata,
            "mmd2_before": result.mmd_before,
            "mmd2_after": result.mmd_after,
            "best_step": result.best_step,
            "bandwidths": list(result.bandwidths),
            "n_cells": result.n_cells,
        },
    )
    write_mmd_table(outputs.mmd_tsv, result)
    write_history(outputs.history_tsv, result)
