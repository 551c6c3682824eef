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
from collections.abc import Iterable, Mapping
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
from ccfm.io.h5ad import read_control_cells as read_h5ad_controls
from ccfm.io.predictions import write_predictions
from ccfm.io.splits import read_split
from ccfm.model.checkpoint import LoadedModel, load_model
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

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> GenerateSettings:
        return settings_from(cls, "generate", section)


@dataclass
class GenerationSetup:
    """A trained model loaded on its device with the sampler settings: what every prediction rule starts from."""

    model_pt: Path
    model: LoadedModel
    device: torch.device
    settings: GenerateSettings


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
    return GenerationSetup(Path(model_pt), load_model(model_pt, device), device, settings)


def label_seed(seed: int, label: str) -> list[int]:
    """Seed sequence for one perturbation: the run seed and a checksum of its label."""
    return [int(seed) & 0xFFFFFFFF, zlib.crc32(label.encode())]


def controls_mean(data: ExpressionData, control_rows: np.ndarray) -> np.ndarray:
    """Mean profile (G,) of the control cells generation starts from, read in chunks."""
    return row_moments(data, control_rows, chunk=4096)[0]


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
    """Generate ``cells_per_perturbation`` cells (n, G) for one perturbation, log1p ≥ 0.

    A control-anchored model starts each cell's flow at its control cell moved by the mean
    model's predicted shift and re-centres the generated cells on the mean of the controls it
    starts from (``control_mean``, computed from ``control_rows`` when not given) plus that
    shift: in another cell context (adaptation) the shift applies to that context's controls.
    Labels the mean model cannot anchor (unseen singles) start at the control cell unmoved.
    """
    rng = np.random.default_rng(label_seed(seed, label))
    n_cells = settings.cells_per_perturbation
    sources = rng.choice(control_rows, size=n_cells, replace=control_rows.size < n_cells)
    generator = torch.Generator(device=device).manual_seed(int(rng.integers(2**63 - 1)))
    pert_row = model.vocab.batch_ids([label]).to(device)
    all_genes = torch.arange(data.n_genes, device=device)
    anchored = model.denoiser.settings.source == "control" and model.mean_model is not None
    shift = model.mean_model.delta(label) if anchored else None
    blocks = []
    for start in range(0, n_cells, settings.batch_size):
        rows = sources[start : start + settings.batch_size]
        source = torch.from_numpy(data.dense_rows(rows)).to(device)
        batch = source.shape[0]
        x_start = None if shift is None else source + shift.to(device)
        expression, _ = model.denoiser.generate(
            all_genes.expand(batch, -1),
            source,
            pert_row.expand(batch, -1),
            latent_steps=settings.latent_steps,
            expr_steps=settings.expr_steps,
            method=settings.method,
            generator=generator,
            x_start=x_start,
        )
        blocks.append(expression.float().cpu().numpy())
    cells = np.concatenate(blocks, axis=0)
    if shift is not None:
        reference = controls_mean(data, control_rows) if control_mean is None else control_mean
        cells = match_mean(cells, reference + shift.numpy())
    return cells


def read_control_cells(
    processed_h5ad: str | Path, control_label: str = CONTROL_LABEL, chunk_size: int = 10000
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
    model, device, settings = generation.model, generation.device, generation.settings
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
    predicted: dict[str, np.ndarray] = {}
    reference = controls_mean(controls, control_rows)
    for label in tqdm(labels, desc="predict", mininterval=5.0):
        predicted[label] = predict_label(model, controls, control_rows, label, settings, seed, device, reference)
    seconds = time.perf_counter() - started
    n_cells = sum(cells.shape[0] for cells in predicted.values())
    log.info(
        "generated %d cells for %d perturbations in %.1f s (%.1f cells/s)",
        n_cells,
        len(labels),
        seconds,
        n_cells / seconds,
    )
    write_predictions(out_h5ad, out_means_csv, controls.genes, predicted, controls.matrix, control_label)
    return {"seconds": seconds, "cells": float(n_cells), "cells_per_second": n_cells / max(seconds, 1e-9)}
