"""A small public-file-like dataset: log1p, and most perturbed genes are not among the genes kept.

Public processed screens (e.g. Norman 2019 with its 500 most variable genes) store log1p
expression of a gene subset and label cells with perturbations of genes that are often outside
that subset. :func:`write_unmeasured_dataset` builds such a file from the seeded simulator:
counts over all simulated genes are normalised (total 1e4) and log1p-transformed, then the
columns of all but ``n_measured_perturbed`` perturbed genes are dropped, so their cells keep
the downstream effects while the perturbed gene itself has no column.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from ccfm.data.simulate import load_ground_truth, simulate_demo

SIZES = {
    "n_genes": 90,
    "n_real_symbols": 40,
    "n_singles": 8,
    "n_doubles": 10,
    "n_control_cells": 300,
    "cells_per_condition": 30,
    "n_target_control_cells": 120,
    "n_target_singles": 2,
    "n_target_doubles": 2,
    "target_cells_per_condition": 20,
}


@dataclass
class UnmeasuredDataset:
    raw: Path  # log1p h5ad, obs["target_gene"] canonical labels, non-targeting controls
    target_raw: Path  # the simulated target context (raw counts over all genes)
    perturbed: list[str]  # every perturbed gene of the simulation
    measured: list[str]  # the perturbed genes kept as columns
    unmeasured: list[str]  # the perturbed genes without a column
    doubles: list[str]  # canonical doubles present in the cells


def write_unmeasured_dataset(root: Path, seed: int = 11, n_measured_perturbed: int = 2) -> UnmeasuredDataset:
    """Write ``root/raw.h5ad`` (see module doc) and describe which perturbed genes it measures."""
    paths = simulate_demo(root / "simulated", seed=seed, **SIZES)
    truth = load_ground_truth(paths["ground_truth"])
    perturbed = sorted(str(g) for g in truth["perturbed_genes"])
    measured = perturbed[:n_measured_perturbed]
    unmeasured = perturbed[n_measured_perturbed:]
    counts = ad.read_h5ad(paths["raw"])
    matrix = sp.csr_matrix(counts.X, dtype=np.float64)
    totals = np.asarray(matrix.sum(axis=1)).ravel()
    # normalise over all genes first, as a public file's authors did before subsetting
    logged = sp.diags(1e4 / np.maximum(totals, 1.0)) @ matrix
    logged.data = np.log1p(logged.data)
    keep = ~np.isin(counts.var_names.astype(str), unmeasured)
    adata = ad.AnnData(
        X=sp.csr_matrix(logged[:, keep], dtype=np.float32), obs=counts.obs.copy(), var=counts.var.iloc[keep].copy()
    )
    raw = root / "raw.h5ad"
    adata.write_h5ad(raw)
    conditions = [str(c) for c in truth["conditions"]]
    return UnmeasuredDataset(
        raw, paths["target_raw"], perturbed, measured, unmeasured, [c for c in conditions if "+" in c]
    )
