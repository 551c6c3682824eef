"""Cells of the simulated world: counts ~ NB(mean = library * softmax(rates)), with log-normal library
sizes, a per-cell perturbation efficiency (Beta) and shared cell-state programmes adding gene-gene
correlation; one context (source or target) as an AnnData, and the oracle's expected log1p mean."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ccfm import PERT_COLUMN
from ccfm.config import section_defaults
from ccfm.data.simulate_world import SimulatedWorld

log = logging.getLogger(__name__)


def sample_cells(
    world: SimulatedWorld,
    shift: np.ndarray,
    n_cells: int,
    library_mean: float,
    baseline_shift: np.ndarray,
    perturbed: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """Integer counts (n_cells x genes) of one condition."""
    n_genes = world.genes.size
    efficiency = rng.beta(6.0, 2.0, size=(n_cells, 1)) if perturbed else np.zeros((n_cells, 1))
    state = rng.normal(size=(n_cells, world.programs.shape[0])) @ world.programs
    log_rate = world.log_base + baseline_shift + efficiency * shift + state
    fraction = np.exp(log_rate - log_rate.max(axis=1, keepdims=True))
    fraction /= fraction.sum(axis=1, keepdims=True)
    library = np.exp(rng.normal(np.log(library_mean), 0.35, size=(n_cells, 1)))
    mean = library * fraction
    # Gamma-Poisson mixture == negative binomial with dispersion theta.
    rate = rng.gamma(shape=world.theta, scale=mean / world.theta, size=(n_cells, n_genes))
    return rng.poisson(rate)


def context_anndata(
    world: SimulatedWorld,
    conditions: list[tuple[str, np.ndarray, bool]],
    cells: dict[str, int],
    library_mean: float,
    baseline_shift: np.ndarray,
    prefix: str,
    rng: np.random.Generator,
) -> ad.AnnData:
    blocks, labels = [], []
    for name, shift, perturbed in conditions:
        blocks.append(
            sp.csr_matrix(
                sample_cells(world, shift, cells[name], library_mean, baseline_shift, perturbed, rng).astype(np.float32)
            )
        )
        labels.extend([name] * cells[name])
    counts = sp.vstack(blocks, format="csr")
    # Shuffle cell order so no code can rely on cells being grouped by condition.
    order = rng.permutation(counts.shape[0])
    obs = pd.DataFrame(
        {PERT_COLUMN: pd.Categorical(np.asarray(labels)[order])},
        index=[f"{prefix}{i:06d}" for i in range(counts.shape[0])],
    )
    var = pd.DataFrame({"real_symbol": world.is_real_symbol}, index=pd.Index(world.genes, name=None))
    return ad.AnnData(X=counts[order], obs=obs, var=var)


def expected_log1p_mean(
    world: SimulatedWorld,
    shift: np.ndarray,
    *,
    n_cells: int,
    library_mean: float,
    rng: np.random.Generator,
    target_sum: float = section_defaults("preprocess")["target_sum"],
    perturbed: bool = True,
    chunk: int = 2000,
) -> np.ndarray:
    """Monte-Carlo estimate of a condition's mean log1p-normalised profile (the oracle's prediction).

    Draws ``n_cells`` fresh cells of the condition from the simulator and averages
    ``log1p(counts / library * target_sum)``, the scale the pipeline scores on.
    """
    total = np.zeros(world.genes.size)
    zero = np.zeros(world.genes.size)
    for start in range(0, n_cells, chunk):
        size = min(chunk, n_cells - start)
        counts = sample_cells(world, shift, size, library_mean, zero, perturbed, rng).astype(np.float64)
        library = np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
        total += np.log1p(counts / library * target_sum).sum(axis=0)
    return total / n_cells
