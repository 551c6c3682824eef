"""Test data the scGPT-backed tests share: checkpoint copies, random vocabulary ids, small log1p h5ad files.

The tiny checkpoints themselves come from the session fixture ``tiny_scgpt_checkpoint`` (conftest.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ccfm.scgpt.checkpoint import CHECKPOINT_FILES

# Census vocabulary ids 0..60693 are genes; the special tokens (<pad>, <cls>, <eoc>) follow.
N_GENE_TOKENS = 60694
# The smallest transformer that still loads like the real checkpoint: for tests that only need wiring.
SMALL_SCGPT_SIZES = {"embsize": 16, "nlayers": 1, "nheads": 2, "d_hid": 16}


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """Copy the three checkpoint files into ``dst``, so a test can break the copy, not the shared original."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def random_vocab_ids(n_genes: int, seed: int, unmapped: Sequence[int] = ()) -> np.ndarray:
    """Distinct random gene-token ids (int64), with -1 (no vocabulary entry) at the ``unmapped`` positions."""
    ids = np.random.default_rng(seed).choice(N_GENE_TOKENS, size=n_genes, replace=False).astype(np.int64)
    ids[list(unmapped)] = -1
    return ids


def write_log1p_h5ad(path: Path, counts: np.ndarray, labels: Sequence[str]) -> Path:
    """A processed.h5ad: CSR float32 log1p(counts), cells ``c{i}`` labelled in ``target_gene``, genes ``g{j}``."""
    n_cells, n_genes = counts.shape
    adata = ad.AnnData(
        X=sp.csr_matrix(np.log1p(counts).astype(np.float32)),
        obs=pd.DataFrame({"target_gene": list(labels)}, index=[f"c{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )
    adata.write_h5ad(path)
    return path
