"""Running statistics of scGPT features and the latent normalisation CCFM trains on.

Statistics are per feature dimension over *covered* gene features only (non-zero, mapped genes:
the ones scGPT actually produced); uncovered positions are structural zeros and stay exactly zero
through :meth:`LatentStats.normalize` and :meth:`LatentStats.denormalize`.

Batch statistics are merged with Chan et al.'s parallel update of (count, mean, M2) in float64,
so the result does not depend on how the stream is cut into batches.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from tqdm import tqdm

from ccfm import CONTROL_LABEL, PERT_COLUMN
from ccfm.config import section_defaults
from ccfm.data.moments import RunningMoments
from ccfm.io.atomic import write_binary_atomic
from ccfm.io.h5ad import backed_matrix, read_obs_labels, read_var
from ccfm.io.splits import read_split

log = logging.getLogger(__name__)

# The schema's `latent.target_std` default (one home for it).
TARGET_STD: float = section_defaults("latent")["target_std"]

NORM_EPS = 1e-6


def add_features(moments: RunningMoments, features: torch.Tensor) -> None:
    """Merge the rows of ``features`` (N, D) into ``moments`` (reduced in float64 on the CPU)."""
    if features.ndim != 2 or features.shape[1] != moments.mean.shape[0]:
        raise ValueError(f"expected features of shape (N, {moments.mean.shape[0]}), got {tuple(features.shape)}")
    x = features.detach().to("cpu", torch.float64)
    if x.shape[0] == 0:
        return
    batch_mean = x.mean(dim=0)
    moments.merge_moments(int(x.shape[0]), batch_mean.numpy(), ((x - batch_mean) ** 2).sum(dim=0).numpy())


@dataclass
class LatentStats:
    """Per-dimension mean and variance of raw features and the target scale of the latent."""

    mean: torch.Tensor  # (D,)
    var: torch.Tensor  # (D,)
    target_std: float = TARGET_STD
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def std(self) -> torch.Tensor:
        return self.var.clamp_min(0).sqrt()

    def _params(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.mean.to(device=z.device, dtype=z.dtype)
        scale = (self.std.to(device=z.device, dtype=z.dtype) + NORM_EPS) / self.target_std
        return mean, scale

    def normalize(self, z: torch.Tensor, covered_mask: torch.Tensor) -> torch.Tensor:
        """``(z - mean) / (std + 1e-6) * target_std`` at covered positions; exactly 0 elsewhere."""
        mean, scale = self._params(z)
        out = (z - mean) / scale
        return torch.where(
            covered_mask.to(z.device).unsqueeze(-1), out, torch.zeros((), dtype=z.dtype, device=z.device)
        )

    def denormalize(self, z: torch.Tensor, covered_mask: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize` at covered positions; exactly 0 elsewhere."""
        mean, scale = self._params(z)
        out = z * scale + mean
        return torch.where(
            covered_mask.to(z.device).unsqueeze(-1), out, torch.zeros((), dtype=z.dtype, device=z.device)
        )

    def save(self, path: str | Path) -> None:
        """torch.save of plain tensors plus JSON metadata (loadable with weights_only=True), atomic."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "mean": self.mean.detach().cpu().to(torch.float64),
            "var": self.var.detach().cpu().to(torch.float64),
            "target_std": float(self.target_std),
            "metadata_json": json.dumps(self.metadata, sort_keys=True),
        }
        write_binary_atomic(path, functools.partial(torch.save, payload))

    @classmethod
    def load(cls, path: str | Path) -> LatentStats:
        """Read a file written by :meth:`save` (weights_only: no code is unpickled)."""
        payload = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"mean", "var", "target_std", "metadata_json"} - set(payload)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}: not a latent_stats.pt file (rerun calibrate_latent)")
        return cls(payload["mean"], payload["var"], float(payload["target_std"]), json.loads(payload["metadata_json"]))

    @classmethod
    def from_running(
        cls, stats: RunningMoments, target_std: float, metadata: dict[str, Any] | None = None
    ) -> LatentStats:
        if stats.n < 2:
            raise ValueError("calibration saw fewer than two covered gene features: no usable statistics")
        meta = dict(metadata or {})
        meta["n_features"] = int(stats.n)
        return cls(
            torch.from_numpy(stats.mean.copy()), torch.from_numpy(stats.variance(ddof=0)), float(target_std), meta
        )

    def check_compatible(self, model_id: str, genes_hash: str) -> None:
        """Raise if these stats were computed for another model or gene panel."""
        for key, value in (("model_id", model_id), ("genes_hash", genes_hash)):
            if self.metadata.get(key) != value:
                raise ValueError(
                    f"latent stats were computed with {key}={self.metadata.get(key)!r}, not {value!r}: "
                    "rerun calibrate_latent for this dataset and model"
                )


def genes_hash(genes: Sequence[str], vocab_ids: np.ndarray) -> str:
    """Short stable hash of the gene panel and its vocab mapping."""
    digest = hashlib.sha256("\n".join(map(str, genes)).encode())
    digest.update(np.ascontiguousarray(vocab_ids, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def iter_expression_batches(
    h5ad: str | Path, cell_indices: np.ndarray, batch_size: int, progress: str | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(indices, dense rows (b, G) float32)`` of ``X`` for sorted ``cell_indices``.

    The file is opened backed and read ``batch_size`` rows at a time; only one batch is dense.
    """
    indices = np.sort(np.asarray(cell_indices, dtype=np.int64))
    # X only: anndata's backed mode would read layers["counts"] into memory.
    with backed_matrix(h5ad) as matrix:
        n_obs = matrix.shape[0]
        if indices.size and (indices[0] < 0 or indices[-1] >= n_obs):
            raise IndexError(f"cell indices out of range for {h5ad} ({n_obs} cells)")
        starts = range(0, indices.size, batch_size)
        for start in tqdm(starts, desc=progress, disable=progress is None, unit="batch"):
            chunk = indices[start : start + batch_size]
            rows = matrix[chunk]
            rows = rows.toarray() if sp.issparse(rows) else np.asarray(rows)
            yield chunk, rows.astype(np.float32, copy=False)


def choose_calibration_cells(cell_indices: np.ndarray, max_cells: int | None, seed: int) -> np.ndarray:
    """At most ``max_cells`` of ``cell_indices`` drawn without replacement from ``seed`` (sorted)."""
    cells = np.unique(np.asarray(cell_indices, dtype=np.int64))
    if max_cells is not None and cells.size > max_cells:
        cells = np.sort(np.random.default_rng(seed).choice(cells, size=max_cells, replace=False))
    return cells


def calibrate(
    extractor: Any,
    processed_h5ad: str | Path,
    cell_indices: np.ndarray,
    batch_size: int,
    max_cells: int | None,
    seed: int,
    target_std: float = TARGET_STD,
    genes: Sequence[str] | None = None,
) -> LatentStats:
    """Stream (a seeded subsample of) ``cell_indices`` through ``extractor``; return the stats."""
    if genes is not None:
        if list(read_var(processed_h5ad).index.astype(str)) != list(map(str, genes)):
            raise ValueError(
                f"the gene list does not match the var_names of {processed_h5ad} (order or content); "
                "rerun gene_vocab_map for this dataset"
            )
    cells = choose_calibration_cells(cell_indices, max_cells, seed)
    if cells.size == 0:
        raise ValueError("no cells to calibrate on: the training cell list is empty")
    stats = RunningMoments.empty(extractor.dim)
    for _, rows in iter_expression_batches(processed_h5ad, cells, batch_size, progress="calibrating scGPT features"):
        _, features = extractor.extract_sparse(rows)
        if features:
            add_features(stats, torch.cat([f.cpu() for f in features], dim=0))
    gene_names = list(genes) if genes is not None else [str(i) for i in range(extractor.n_genes)]
    metadata = {
        "model_id": extractor.model_id,
        "genes_hash": genes_hash(gene_names, extractor.gene_vocab_ids),
        "n_cells": int(cells.size),
        "seed": int(seed),
        "max_tokens_per_cell": extractor.max_tokens_per_cell,
        "zero_tokens": extractor.zero_tokens,
        "genes": gene_names,
        "gene_vocab_ids": extractor.gene_vocab_ids.tolist(),
    }
    result = LatentStats.from_running(stats, target_std, metadata)
    log.info(
        "calibrated on %d cells, %d covered gene features; feature std range %.4g..%.4g",
        cells.size,
        stats.n,
        float(result.std.min()),
        float(result.std.max()),
    )
    return result


def training_cell_indices(
    processed_h5ad: str | Path, split_json: str | Path, pert_col: str = PERT_COLUMN
) -> np.ndarray:
    """Rows of ``processed_h5ad`` a fold may learn from: its training perturbations and the controls.

    Held-out (``test``) perturbations are never included; a label in both lists is an error.
    """
    split = read_split(split_json)
    train = set(map(str, split["train"]))
    try:
        labels = read_obs_labels(processed_h5ad, pert_col)  # the label column only: not names, not other columns
    except KeyError as error:
        raise ValueError(
            f"{processed_h5ad} has no obs column '{pert_col}' (expected from the preprocess rule)"
        ) from error
    allowed = train | {str(split.get("controls", CONTROL_LABEL))}
    return np.flatnonzero(np.isin(labels, sorted(allowed))).astype(np.int64)


def calibrate_to_files(
    processed_h5ad: str | Path,
    split_json: str | Path,
    gene_vocab_tsv: str | Path,
    scgpt_model: str | Path,
    out_stats: str | Path,
    *,
    latent: Mapping[str, Any],
    seed: int,
    threads: int,
) -> LatentStats:
    """The ``calibrate_latent`` rule: feature statistics over a fold's training cells, saved to ``out_stats``.

    ``scgpt_model`` is the checkpoint's ``best_model.pt``; ``latent`` the dataset's ``latent`` section.
    """
    from ccfm.distributed import pick_device
    from ccfm.scgpt.extractor import ExtractorSettings, ScGPTFeatureExtractor
    from ccfm.scgpt.vocab import read_gene_vocab, vocab_id_array

    torch.set_num_threads(int(threads))
    mapping = read_gene_vocab(gene_vocab_tsv)
    settings = ExtractorSettings.from_latent(latent, seed)
    extractor = ScGPTFeatureExtractor(Path(scgpt_model).parent, vocab_id_array(mapping), str(pick_device()), settings)
    cells = training_cell_indices(processed_h5ad, split_json)
    log.info("%s: %d training cells (training perturbations + controls)", split_json, len(cells))
    stats = calibrate(
        extractor,
        processed_h5ad,
        cells,
        batch_size=latent["batch_size"],
        max_cells=latent["calibration_cells"],
        seed=seed,
        target_std=latent["target_std"],
        genes=list(mapping["gene"]),
    )
    stats.save(out_stats)
    return stats
