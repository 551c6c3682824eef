"""Predict perturbations with a trained CCFM model and write the prediction files.

For every perturbation to predict (the fold's held-out list plus the dataset's ``predict:``
entries, which may be combinations never measured), ``cells_per_perturbation`` control cells are
drawn as sources and pushed through the two-stage cascaded sampler over *all* genes. Each
perturbation's draws come from a generator seeded by the run seed and the label itself, so a
prediction does not change when other perturbations are added to the list. The real control
cells are written beside the predictions (cell-eval computes deltas against them). They are
also all that is read of ``processed.h5ad``: memory grows with the number of control cells,
not with the whole file.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ccfm import CONTROL_LABEL
from ccfm.config import section_defaults, settings_from
from ccfm.data.conditions import conditions_to_predict
from ccfm.distributed import pick_device
from ccfm.io.h5ad import CHUNK_SIZE
from ccfm.io.h5ad import read_control_cells as read_h5ad_controls
from ccfm.io.predictions import write_predictions
from ccfm.io.splits import read_split
from ccfm.model.checkpoint import LoadedModel, load_model
from ccfm.model.denoiser import FlowStart, Integration
from ccfm.model.expression import ExpressionData, row_moments
from ccfm.model.mean_model import match_mean

log = logging.getLogger(__name__)


_GENERATE = section_defaults("generate")


@dataclass
class GenerateSettings:
    """Sampler knobs from the merged ``generate`` config section."""

    cells_per_perturbation: int = _GENERATE["cells_per_perturbation"]
    method: str = _GENERATE["method"]
    latent_steps: int = _GENERATE["latent_steps"]
    expr_steps: int = _GENERATE["expr_steps"]
    batch_size: int = _GENERATE["batch_size"]
    # Anchored flow: re-centre the generated cells on the mean model's predicted mean.
    recenter: bool = _GENERATE["recenter"]

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> GenerateSettings:
        return settings_from(cls, "generate", section)

    @property
    def integration(self) -> Integration:
        """The ODE part of the settings, as the denoiser takes it."""
        return Integration(self.latent_steps, self.expr_steps, self.method)


@dataclass
class GenerationSetup:
    """A trained model loaded on its device with the sampler settings: what every prediction rule starts from."""

    model: LoadedModel
    device: torch.device
    settings: GenerateSettings
    model_pt: Path | None = None  # the file it was loaded from (for messages)


@dataclass(frozen=True)
class ControlCells:
    """The control cells generation starts from: the ``rows`` of ``data`` cells are drawn from, and
    the mean profile (G,) a recentred label is centred on (computed from those rows when not given)."""

    data: ExpressionData
    rows: np.ndarray
    mean: np.ndarray | None = None


def prepare_generation(
    model_pt: str | Path,
    settings: GenerateSettings | Mapping[str, Any],
    *,
    threads: int | None = None,
    device: str | torch.device | None = None,
) -> GenerationSetup:
    """Load ``model_pt`` for generation; ``settings`` may be the ``generate`` config section.

    ``threads`` caps torch's CPU threads (a rule's ``threads:``; torch would otherwise use every
    core of a shared node); ``device`` defaults to :func:`ccfm.distributed.pick_device`.
    """
    if threads is not None:
        torch.set_num_threads(int(threads))
    device = torch.device(device) if device is not None else pick_device()
    if not isinstance(settings, GenerateSettings):
        settings = GenerateSettings.from_section(settings)
    log.info("generating on %s with %d CPU thread(s): %s", device, torch.get_num_threads(), settings)
    return GenerationSetup(load_model(model_pt, device), device, settings, model_pt=Path(model_pt))


def label_seed(seed: int, label: str) -> list[int]:
    """Seed sequence for one perturbation: the run seed and a checksum of its label."""
    return [int(seed) & 0xFFFFFFFF, zlib.crc32(label.encode())]


def controls_mean(data: ExpressionData, control_rows: np.ndarray) -> np.ndarray:
    """Mean profile (G,) of the control cells generation starts from, read in chunks."""
    return row_moments(data, control_rows, chunk=4096)[0]


@dataclass
class _Block:
    """Up to ``batch_size`` cells of one label: their start and condition cells and noise."""

    label: str
    starts: np.ndarray
    conditions: np.ndarray
    pert_ids: torch.Tensor  # (1, 2)
    shift: torch.Tensor | None
    z_noise: torch.Tensor | None
    x_noise: torch.Tensor | None


def _label_blocks(
    generation: GenerationSetup, controls: ControlCells, label: str, seed: int, n_cells: int | None = None
) -> list[_Block]:
    """One label's draws (``n_cells``, default ``settings.cells_per_perturbation``), from
    generators seeded by the run seed and the label alone.

    Cells are drawn in blocks of ``settings.batch_size`` and each block's noise in turn from the
    label's own generator, so a label's cells do not depend on which other labels are generated
    with it, nor on how the blocks are packed into network batches.
    """
    model, settings, device = generation.model, generation.settings, generation.device
    data, control_rows = controls.data, controls.rows
    rng = np.random.default_rng(label_seed(seed, label))
    n_cells = settings.cells_per_perturbation if n_cells is None else int(n_cells)
    starts = rng.choice(control_rows, size=n_cells, replace=control_rows.size < n_cells)
    generator = torch.Generator(device=device).manual_seed(int(rng.integers(2**63 - 1)))
    flow = model.denoiser.settings
    conditions = starts
    if flow.source == "control" and flow.condition_cell == "separate":
        conditions = rng.choice(control_rows, size=n_cells, replace=control_rows.size < n_cells)
    anchored = flow.source == "control" and model.mean_model is not None
    shift = model.mean_model.delta(label) if anchored else None
    pert_ids = model.vocab.batch_ids([label]).to(device)
    latent_dim = model.denoiser.model.config.latent_dim
    blocks = []
    for begin in range(0, n_cells, settings.batch_size):
        size = min(settings.batch_size, n_cells - begin)
        z_noise = x_noise = None
        if model.denoiser.latent_enabled:
            z_noise = torch.randn((size, data.n_genes, latent_dim), generator=generator, device=device)
        if flow.source == "gaussian":
            x_noise = torch.randn((size, data.n_genes), generator=generator, device=device)
        blocks.append(
            _Block(
                label,
                starts[begin : begin + size],
                conditions[begin : begin + size],
                pert_ids,
                None if shift is None else shift.to(device),
                z_noise,
                x_noise,
            )
        )
    return blocks


def _packed(blocks: Iterable[_Block], batch_size: int) -> Iterator[list[_Block]]:
    """Consecutive blocks grouped into network batches of at most ``batch_size`` cells."""
    group: list[_Block] = []
    size = 0
    for block in blocks:
        if group and size + len(block.starts) > batch_size:
            yield group
            group, size = [], 0
        group.append(block)
        size += len(block.starts)
    if group:
        yield group


def _generate_group(generation: GenerationSetup, data: ExpressionData, group: list[_Block]) -> list[np.ndarray]:
    """Run one network batch made of several labels' blocks; return each block's cells."""
    model, settings, device = generation.model, generation.settings, generation.device
    starts = torch.from_numpy(data.dense_rows(np.concatenate([b.starts for b in group]))).to(device)
    sources = torch.from_numpy(data.dense_rows(np.concatenate([b.conditions for b in group]))).to(device)
    sizes = [len(b.starts) for b in group]
    shifts = [torch.zeros(data.n_genes, device=device) if b.shift is None else b.shift for b in group]
    x_start = starts + torch.cat([s.expand(n, -1) for s, n in zip(shifts, sizes)])
    pert_ids = torch.cat([b.pert_ids.expand(n, -1) for b, n in zip(group, sizes)])
    z_noise = torch.cat([b.z_noise for b in group]) if group[0].z_noise is not None else None
    x_noise = torch.cat([b.x_noise for b in group]) if group[0].x_noise is not None else None
    batch = starts.shape[0]
    expression, _ = model.denoiser.generate(
        torch.arange(data.n_genes, device=device).expand(batch, -1),
        sources,
        pert_ids,
        settings.integration,
        FlowStart(x_start=x_start, z_noise=z_noise, x_noise=x_noise),
    )
    cells = expression.float().cpu().numpy()
    return np.split(cells, np.cumsum(sizes)[:-1])


def generate_labels(
    generation: GenerationSetup,
    controls: ControlCells,
    labels: Sequence[str],
    seed: int,
    *,
    progress: str | None = None,
    sources: dict[str, np.ndarray] | None = None,
    n_cells: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Generate ``cells_per_perturbation`` cells (n, G), log1p ≥ 0, for every label.

    A control-anchored model starts each cell's flow at a drawn control cell moved by the mean
    model's predicted shift; the network's control-cell input is that same cell or, for models
    trained with ``condition_cell: separate``, an independent draw (as in training). With
    ``settings.recenter`` each label's cells are then re-centred on the mean of the controls
    they start from (``controls.mean``, computed from ``controls.rows`` when not given) plus that
    shift: in another cell context (adaptation) the shift applies to that context's controls.
    Without it the flow's own mean stands. Labels the mean model cannot anchor (unseen singles)
    start at the control cell unmoved.

    ``generation`` is the loaded model, its device and the sampler settings (``settings`` above).
    The cells of several labels share network batches of ``settings.batch_size`` (a label's
    draws are its own: see :func:`_label_blocks`); ``progress`` names a progress bar over them.
    ``sources``, when given, receives each label's starting control rows; ``n_cells``
    overrides ``settings.cells_per_perturbation`` per label (e.g. a challenge CSV's counts).
    """
    model, settings = generation.model, generation.settings
    counts = dict(n_cells or {})
    blocks = [
        block for label in labels for block in _label_blocks(generation, controls, label, seed, counts.get(label))
    ]
    if sources is not None:  # each label's starting control rows, for the caller's records
        for label in labels:
            sources[label] = np.concatenate([b.starts for b in blocks if b.label == label])
    pieces: dict[str, list[np.ndarray]] = {label: [] for label in labels}
    groups = list(_packed(blocks, settings.batch_size))
    for group in tqdm(groups, desc=progress, mininterval=5.0, disable=progress is None):
        for block, cells in zip(group, _generate_group(generation, controls.data, group)):
            pieces[block.label].append(cells)
    predicted = {label: np.concatenate(parts, axis=0) for label, parts in pieces.items()}
    anchored = model.denoiser.settings.source == "control" and model.mean_model is not None
    if anchored and settings.recenter:
        reference = controls_mean(controls.data, controls.rows) if controls.mean is None else controls.mean
        for label in labels:
            shift = model.mean_model.delta(label)
            if shift is not None:
                predicted[label] = match_mean(predicted[label], reference + shift.numpy())
    return predicted


def predict_label(
    model: LoadedModel,
    data: ExpressionData,
    control_rows: np.ndarray,
    label: str,
    settings: GenerateSettings,
    seed: int,
    device: torch.device,
    control_mean: np.ndarray | None = None,
) -> np.ndarray:
    """The cells of one label (:func:`generate_labels`; the same cells as when generated with others)."""
    generation = GenerationSetup(model, device, settings)
    return generate_labels(generation, ControlCells(data, control_rows, control_mean), [label], seed)[label]


def read_control_cells(
    processed_h5ad: str | Path, control_label: str = CONTROL_LABEL, chunk_size: int = CHUNK_SIZE
) -> ExpressionData:
    """The control cells of ``processed.h5ad`` (:func:`ccfm.io.h5ad.read_control_cells`) as generation sources."""
    rows = read_h5ad_controls(processed_h5ad, control_label, chunk_size=chunk_size)
    return ExpressionData(rows.matrix, rows.genes, rows.labels)


def predict_to_files(
    generation: GenerationSetup,
    processed_h5ad: str | Path,
    split_json: str | Path,
    extra_labels: Iterable[str],
    out_h5ad: str | Path,
    out_means_csv: str | Path,
    *,
    seed: int,
    control_label: str = CONTROL_LABEL,
) -> dict[str, float]:
    """Predict every held-out and extra perturbation; write ``pred.h5ad`` and ``pred_means.csv``.

    Returns timing numbers (``seconds``, ``cells``, ``cells_per_second``) for the log/benchmark.
    """
    model = generation.model
    controls = read_control_cells(processed_h5ad, control_label)
    if controls.genes != model.genes:
        raise ValueError(
            f"{generation.model_pt} was trained on {len(model.genes)} genes that differ from the "
            f"{controls.n_genes} genes of "
            f"{processed_h5ad}; retrain the model after re-preprocessing"
        )
    split = read_split(split_json)
    labels = conditions_to_predict(split["test"], extra_labels, control_label)
    for label in labels:
        model.vocab.ids(label)  # fail before any generation on a gene the model cannot embed
    # Positions among the controls: draws the same cells as the controls' row numbers in the file would.
    control_rows = np.arange(controls.matrix.shape[0])
    started = time.perf_counter()
    reference = controls_mean(controls, control_rows)
    sources: dict[str, np.ndarray] = {}
    predicted = generate_labels(
        generation, ControlCells(controls, control_rows, reference), labels, seed, progress="predict", sources=sources
    )
    seconds = time.perf_counter() - started
    n_cells = sum(cells.shape[0] for cells in predicted.values())
    log.info(
        "generated %d cells for %d perturbations in %.1f s (%.1f cells/s)",
        n_cells,
        len(labels),
        seconds,
        n_cells / seconds,
    )
    write_predictions(out_h5ad, out_means_csv, controls.genes, predicted, controls.matrix, control_label, sources)
    return {"seconds": seconds, "cells": float(n_cells), "cells_per_second": n_cells / max(seconds, 1e-9)}
