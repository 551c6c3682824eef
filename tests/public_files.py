"""Test-sized combinatorial perturbation files laid out as public files are (issue 21).

A user's first real run is a public file: GEARS' Norman 2019 subset (log1p of a few hundred
highly variable genes, labels ``A+ctrl`` / ``A+B`` / ``ctrl``, almost every perturbed gene outside
the gene columns, and half of the columns never expressed because the panel is shared with other
screens), or scPerturb's release of the same screen (labels ``A`` / ``A_B`` / ``control``).
:func:`write_public_files` builds both from one seeded simulation (:mod:`ccfm.data.simulate`):

- genes: real gene symbols only (the simulator's), plus :data:`NEVER_EXPRESSED` (real symbols from
  the Papalexi 2021 THP-1 panel in ``../shared/data/real``) as all-zero columns, interleaved in a
  fixed shuffled order, as in a shared panel;
- the perturbed genes' own columns are dropped except ``n_measured`` of them (perturbed genes
  outside the panel);
- the cells of ``n_predict`` doubles (both singles present) are left out: they are the doubles a
  user asks for under ``predict:``;
- GEARS file: X = log1p(normalised counts, total 1e4 over all simulated genes), var ``gene_name``;
  scPerturb file: X = raw counts of the same columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ccfm.data.simulate import load_ground_truth, simulate_demo

SIZES = {
    "n_genes": 110,
    "n_real_symbols": 110,
    "n_singles": 8,
    "n_doubles": 13,
    "n_modules": 4,
    "program_genes": 25,
    "joint_program_genes": 20,
    "n_control_cells": 240,
    "cells_per_condition": 24,
    "n_target_control_cells": 40,
    "n_target_singles": 1,
    "n_target_doubles": 1,
    "target_cells_per_condition": 10,
}
# Real symbols of the Papalexi 2021 THP-1 panel (../shared/data/real) that the simulator does not use.
NEVER_EXPRESSED = (
    "PCBP3 ITGB1BP1 SERTAD1 CHEK2 DUSP15 IFT46 COQ10A AGAP10 ACOT11 RDX TMEM175 SLC35E2B COCH MZT1 DTNBP1 "
    "ANTXR1 SCAPER CIT PAK1 APOBEC3G CLDN23 ZNF699 MAPK11 OSGEP HNRNPUL2 SPATA9 SRXN1 MARCKSL1 FUZ LRRC3"
).split()


@dataclass
class PublicFiles:
    gears: Path  # log1p, obs["condition"]: A+ctrl / A+B / ctrl
    scperturb: Path  # raw counts, obs["perturbation"]: A / A_B / control
    genes: list[str]  # the files' genes, in file order
    never_expressed: list[str]
    measured_perturbed: list[str]
    unmeasured_perturbed: list[str]
    singles: list[str]
    doubles_in_file: list[str]  # canonical A+B
    predict: list[str]  # canonical A+B doubles absent from the files, their singles present


def write_public_files(root: Path, seed: int = 5, n_measured: int = 2, n_predict: int = 3) -> PublicFiles:
    root.mkdir(parents=True, exist_ok=True)
    paths = simulate_demo(root / "simulated", seed=seed, **SIZES)
    truth = load_ground_truth(paths["ground_truth"])
    sim = ad.read_h5ad(paths["raw"])
    perturbed = sorted(str(g) for g in truth["perturbed_genes"])
    measured = perturbed[:n_measured]
    unmeasured = perturbed[n_measured:]
    labels = sim.obs["target_gene"].astype(str).to_numpy()
    doubles = sorted({label for label in labels if "+" in label})
    predict = doubles[:n_predict]

    counts = sp.csr_matrix(sim.X, dtype=np.float64)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    logged = sp.diags(1e4 / np.maximum(totals, 1.0)) @ counts  # normalised over all genes, then subset
    logged.data = np.log1p(logged.data)

    keep_cells = ~np.isin(labels, predict)
    keep_genes = ~np.isin(sim.var_names.astype(str), unmeasured)
    genes = [*sim.var_names.astype(str)[keep_genes], *NEVER_EXPRESSED]
    order = np.random.default_rng(seed).permutation(len(genes))
    genes = [genes[i] for i in order]
    n_cells = int(keep_cells.sum())
    zeros = sp.csr_matrix((n_cells, len(NEVER_EXPRESSED)))

    def panel(matrix: sp.csr_matrix) -> sp.csr_matrix:
        block = sp.hstack([matrix[keep_cells][:, keep_genes], zeros], format="csr")
        return sp.csr_matrix(block[:, order], dtype=np.float32)

    kept = labels[keep_cells]
    cells = pd.Index([f"cell{i:05d}" for i in range(n_cells)])
    var = pd.DataFrame({"gene_name": genes}, index=pd.Index(genes))

    def gears_label(label: str, i: int) -> str:
        if label == "non-targeting":
            return "ctrl"
        if "+" in label:
            return label
        return f"{label}+ctrl" if i % 2 else f"ctrl+{label}"  # GEARS writes both orders

    gears_labels = [gears_label(label, i) for i, label in enumerate(kept)]
    gears = ad.AnnData(
        X=panel(logged),
        obs=pd.DataFrame({"condition": gears_labels, "cell_type": "K562"}, index=cells),
        var=var.copy(),
    )
    scperturb_labels = ["control" if lab == "non-targeting" else lab.replace("+", "_") for lab in kept]
    scperturb = ad.AnnData(
        X=panel(counts),
        obs=pd.DataFrame(
            {"perturbation": scperturb_labels, "nperts": [lab.count("_") + 1 for lab in kept]}, index=cells
        ),
        var=var.copy(),
    )
    gears_path, scperturb_path = root / "norman_gears.h5ad", root / "norman_scperturb.h5ad"
    gears.write_h5ad(gears_path)
    scperturb.write_h5ad(scperturb_path)
    singles = sorted({label for label in kept if label != "non-targeting" and "+" not in label})
    return PublicFiles(
        gears=gears_path,
        scperturb=scperturb_path,
        genes=genes,
        never_expressed=list(NEVER_EXPRESSED),
        measured_perturbed=measured,
        unmeasured_perturbed=unmeasured,
        singles=singles,
        doubles_in_file=[d for d in doubles if d not in predict],
        predict=predict,
    )
