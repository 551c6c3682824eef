"""Small training inputs shared by the training tests: a synthetic dataset and a tiny scGPT set-up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

N_GENES = 20
SINGLES = ["G0", "G1", "G2", "G3"]
MODEL = {"d_model": 32, "nhead": 4, "nlayers": 1, "bottleneck": 8, "dh_depth": 1}


class FakeLatent:
    """Deterministic, picklable stand-in for scGPT: per-gene features that depend on the cell's expression."""

    def __init__(self, dim: int = 4) -> None:
        self.proj = torch.linspace(-1, 1, dim)

    def __call__(self, rows: np.ndarray, expr: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(expr)
        return 3.0 * torch.tanh(x[..., None] * self.proj - 1.0) * (x[..., None] > 0)


def write_dataset(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Controls ~ Poisson(2) in log1p; each perturbation knocks its own gene down and one gene up."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(N_GENES)]
    labels, blocks = [], []
    for label, n in [
        ("non-targeting", 120),
        ("G0", 40),
        ("G1", 40),
        ("G2", 40),
        ("G3", 40),
        ("G0+G1", 40),
        ("G2+G3", 40),
    ]:
        counts = rng.poisson(2.0, size=(n, N_GENES)).astype(np.float32)
        for gene in label.split("+") if label != "non-targeting" else []:
            g = int(gene[1:])
            counts[:, g] = 0
            counts[:, 10 + g] += 6
        blocks.append(np.log1p(counts))
        labels += [label] * n
    adata = ad.AnnData(
        X=sp.csr_matrix(np.vstack(blocks)),
        obs=pd.DataFrame({"target_gene": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))]),
        var=pd.DataFrame(index=genes),
    )
    processed = root / "processed.h5ad"
    adata.write_h5ad(processed)
    split = root / "fold1.json"
    split.write_text(
        json.dumps(
            {"fold": 1, "seed": 43, "train": SINGLES + ["G0+G1"], "test": ["G2+G3"], "controls": "non-targeting"}
        )
    )
    return processed, split


def tiny_scgpt_inputs(root: Path, scgpt_dir: Path) -> dict[str, Any]:
    """:func:`write_dataset` with real gene symbols, plus the gene vocab and calibrated fold
    statistics of the (tiny, read-only) scGPT checkpoint ``scgpt_dir``: the data and latent
    keyword arguments of ``train_from_files``."""
    from ccfm.scgpt.calibration import calibrate
    from ccfm.scgpt.checkpoint import census_vocab_with_specials
    from ccfm.scgpt.extractor import ExtractorSettings, ScGPTFeatureExtractor
    from ccfm.scgpt.vocab import map_genes, vocab_id_array, write_gene_vocab

    processed, split = write_dataset(root)
    # rename the genes to real symbols so they map into the census vocabulary
    vocab = census_vocab_with_specials()
    symbols = [g for g in list(vocab)[:400] if not g.startswith("<")][::20][:N_GENES]
    adata = ad.read_h5ad(processed)
    rename = dict(zip(adata.var_names, symbols))
    adata.var_names = symbols

    def canonical(label: str) -> str:
        return label if label == "non-targeting" else "+".join(sorted(rename[p] for p in label.split("+")))

    adata.obs["target_gene"] = [canonical(t) for t in adata.obs["target_gene"].astype(str)]
    adata.write_h5ad(processed)
    info = json.loads(split.read_text())
    for key in ("train", "test"):
        info[key] = [canonical(t) for t in info[key]]
    split.write_text(json.dumps(info))

    mapping = map_genes(symbols, vocab)
    write_gene_vocab(mapping, root / "gene_vocab.tsv")
    # The schema's latent settings, as a training run whose latent section leaves them out reads them.
    extractor = ScGPTFeatureExtractor(scgpt_dir, vocab_id_array(mapping), "cpu", ExtractorSettings.from_latent({}, 1))
    train_rows = np.flatnonzero(adata.obs["target_gene"].isin(info["train"]).to_numpy())
    stats = calibrate(extractor, processed, train_rows, batch_size=32, max_cells=100, seed=1, genes=symbols)
    stats.save(root / "latent_stats.pt")
    return {
        "processed_h5ad": processed,
        "split_json": split,
        "scgpt_dir": scgpt_dir,
        "gene_vocab_tsv": root / "gene_vocab.tsv",
        "latent_stats": root / "latent_stats.pt",
        "genes": symbols,
    }
