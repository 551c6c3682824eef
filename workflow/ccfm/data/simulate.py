"""Seeded simulator for the demo dataset: perturbations on a gene-regulatory network.

:mod:`ccfm.data.simulate_world` draws the world (genes, network, pathway modules, each condition's
true log-rate shift; its docstring describes the generative model), :mod:`ccfm.data.simulate_cells`
draws cells from it, and this module writes the files (:func:`simulate_demo`): ``raw.h5ad`` and
``target_raw.h5ad`` (CSR raw counts, ``obs["target_gene"]`` with ``non-targeting`` controls and
``A+B`` doubles) and ``ground_truth.npz`` (see :func:`simulate_demo` for its arrays). The names
other code uses are importable from here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ccfm.data.conditions import CONTROL
from ccfm.data.simulate_cells import context_anndata, expected_log1p_mean
from ccfm.data.simulate_world import (
    OTHER_SYMBOLS,
    PERTURBABLE_SYMBOLS,
    SimulatedWorld,
    SimulationSizes,
    build_world,
)
from ccfm.io.atomic import atomic_output
from ccfm.io.h5ad import write_h5ad_atomic

__all__ = [
    "OTHER_SYMBOLS",
    "PERTURBABLE_SYMBOLS",
    "SimulatedWorld",
    "SimulationSizes",
    "build_world",
    "expected_log1p_mean",
    "load_ground_truth",
    "simulate_demo",
    "write_ground_truth",
]

log = logging.getLogger(__name__)


def simulate_demo(out_dir: str | Path, seed: int, **sizes: Any) -> dict[str, Path]:
    """Simulate the demo dataset into ``out_dir``; return the written paths by name.

    Writes ``raw.h5ad`` (source context), ``target_raw.h5ad`` (target context) and
    ``ground_truth.npz`` with arrays: ``genes``, ``is_real_symbol``, ``log_base``, ``theta``,
    ``grn`` (regulator x target), ``perturbed_genes``, ``perturbation_sign`` (+1 activation,
    -1 knock-down), ``conditions``, ``condition_type``, ``interaction_type`` (``none`` for
    singles), ``shifts`` and ``additive_shifts`` (conditions x genes, log-rate shift vs control),
    ``interaction`` (= shifts - additive_shifts), ``target_baseline_shift`` (genes),
    ``target_conditions`` (conditions observed in the target), ``module_of`` (module of each
    perturbed gene) and ``cooperating_modules`` (pairs of module ids; both empty for the random
    model), ``seed``. Keyword arguments
    override :class:`SimulationSizes` fields. Same seed and sizes -> identical files.
    """
    unknown = set(sizes) - set(SimulationSizes.__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"unknown simulate option(s) {sorted(unknown)}; allowed: {sorted(SimulationSizes.__dataclass_fields__)}"
        )
    config = SimulationSizes(**sizes)
    rng = np.random.default_rng(seed)
    world = build_world(config, rng)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    zero = np.zeros(world.genes.size)

    source_conditions = [(CONTROL, zero, False)] + [
        (name, shift, True) for name, shift in zip(world.conditions, world.shifts)
    ]
    source_cells = {name: config.cells_per_condition for name, _, _ in source_conditions}
    source_cells[CONTROL] = config.n_control_cells
    source = context_anndata(world, source_conditions, source_cells, config.mean_library_size, zero, "src", rng)

    singles = np.flatnonzero(world.condition_type == "single")
    doubles = np.flatnonzero(world.condition_type == "double")
    picked = np.sort(
        np.concatenate(
            [
                rng.choice(singles, size=config.n_target_singles, replace=False),
                rng.choice(doubles, size=config.n_target_doubles, replace=False),
            ]
        )
    )
    world.target_conditions = world.conditions[picked]
    target_conditions = [(CONTROL, zero, False)] + [(world.conditions[i], world.shifts[i], True) for i in picked]
    target_cells = {name: config.target_cells_per_condition for name, _, _ in target_conditions}
    target_cells[CONTROL] = config.n_target_control_cells
    target = context_anndata(
        world,
        target_conditions,
        target_cells,
        config.mean_library_size * config.target_library_scale,
        world.target_baseline_shift,
        "tgt",
        rng,
    )

    paths = {
        "raw": write_h5ad_atomic(source, out_dir / "raw.h5ad"),
        "target_raw": write_h5ad_atomic(target, out_dir / "target_raw.h5ad"),
        "ground_truth": write_ground_truth(world, seed, out_dir / "ground_truth.npz"),
    }
    log.info(
        "simulated %d source cells (%d singles, %d doubles) and %d target cells (%d conditions) over %d genes",
        source.n_obs,
        singles.size,
        doubles.size,
        target.n_obs,
        picked.size,
        world.genes.size,
    )
    return paths


def write_ground_truth(world: SimulatedWorld, seed: int, path: Path) -> Path:
    """Save the simulator truth as a plain (pickle-free) npz, atomically."""
    arrays = {
        "genes": world.genes,
        "is_real_symbol": world.is_real_symbol,
        "log_base": world.log_base,
        "theta": world.theta,
        "grn": world.grn,
        "perturbed_genes": world.perturbed_genes,
        "perturbation_sign": world.perturbation_sign,
        "conditions": world.conditions,
        "condition_type": world.condition_type,
        "interaction_type": world.interaction_type,
        "shifts": world.shifts,
        "additive_shifts": world.additive_shifts,
        "interaction": world.shifts - world.additive_shifts,
        "target_baseline_shift": world.target_baseline_shift,
        "target_conditions": world.target_conditions,
        "module_of": world.module_of,
        "cooperating_modules": world.cooperating_modules,
        "seed": np.array(seed),
    }
    with atomic_output(path, suffix=".tmp.npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
    return path


def load_ground_truth(path: str | Path) -> dict[str, np.ndarray]:
    """Read ``ground_truth.npz`` (no pickle) into a dict of arrays."""
    with np.load(Path(path), allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
