"""The latent stream's targets: frozen scGPT features of the target cells, normalised per fold.

:func:`scgpt_targets` wires the scGPT checkpoint, the gene-vocabulary map and the fold's
calibrated statistics (``latent_stats.pt``) into the :data:`~ccfm.model.batches.LatentTargets`
callable the loop calls. Features come either on the fly or from a feature cache: the cache lives
in the run's resume directory, ``resume/feature_cache/`` (:data:`FEATURE_CACHE_DIR`), sized by
``latent.cache_max_gb`` and reused when its manifest matches (``ccfm.scgpt.feature_cache``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ccfm.config import section_defaults
from ccfm.distributed import DistContext
from ccfm.model.batches import LatentTargets
from ccfm.model.expression import ExpressionData
from ccfm.scgpt.calibration import LatentStats, genes_hash
from ccfm.scgpt.extractor import ExtractorSettings, ScGPTFeatureExtractor
from ccfm.scgpt.feature_cache import make_latent_source
from ccfm.scgpt.vocab import check_gene_order, read_gene_vocab, vocab_id_array

if TYPE_CHECKING:
    from ccfm.model.request import TrainRequest

log = logging.getLogger(__name__)

# The feature cache of a latent run, under its resume directory (kept when the checkpoint is removed).
FEATURE_CACHE_DIR = "feature_cache"


def scgpt_latent_targets(source: Any, stats: Any, device: str | torch.device | None = None) -> LatentTargets:
    """Latent targets from a ``ccfm.scgpt.feature_cache`` source and fold ``LatentStats``.

    Raw features of the whole target cell -> ``stats.normalize`` at covered genes (others stay 0).
    The expression goes to ``device`` first, so the (B, G, D) scatter and normalisation run
    there: on the host, one rule thread spent seconds a step on them at Norman's sizes.
    """

    def targets(cell_rows: np.ndarray, expression: np.ndarray) -> Tensor:
        expr = torch.from_numpy(expression).to(device or "cpu")
        raw = source.features(cell_rows, expr)
        return stats.normalize(raw, source.covered_mask(cell_rows, expr))

    return targets


def scgpt_targets(
    request: TrainRequest,
    data: ExpressionData,
    train_labels: Sequence[str],
    device: torch.device,
    draws: int,
    dist: DistContext | None = None,
) -> tuple[LatentTargets, int, dict[str, Any]]:
    """Frozen scGPT extractor + feature source + fold statistics -> the latent-target callable."""
    scgpt_dir, gene_vocab_tsv, latent_stats = request.scgpt_dir, request.gene_vocab_tsv, request.latent_stats
    # The merged section: the schema's defaults under what the request gives (one home for them).
    latent = {**section_defaults("latent"), **request.latent_section}
    if scgpt_dir is None or gene_vocab_tsv is None or latent_stats is None:
        raise ValueError(
            "the latent stream needs scgpt_dir, gene_vocab_tsv and latent_stats (or set latent.enabled: false)"
        )
    mapping = read_gene_vocab(gene_vocab_tsv)
    check_gene_order(mapping, data.genes, str(gene_vocab_tsv))
    vocab_ids = vocab_id_array(mapping)
    extractor = ScGPTFeatureExtractor(scgpt_dir, vocab_ids, device, ExtractorSettings.from_latent(latent, request.seed))
    stats = LatentStats.load(latent_stats)
    # A file without the key predates zero tokens: it was calibrated without them.
    calibrated_with = bool(stats.metadata.get("zero_tokens", False))
    if calibrated_with != extractor.zero_tokens:
        raise ValueError(
            f"{latent_stats} was calibrated with latent.zero_tokens={calibrated_with}, "
            f"training runs with {extractor.zero_tokens}; rerun calibrate_latent"
        )
    stats.check_compatible(extractor.model_id, genes_hash(data.genes, vocab_ids))
    if stats.mean.shape[0] != extractor.dim:
        raise ValueError(
            f"{latent_stats} has {stats.mean.shape[0]} dims, the scGPT model {extractor.dim}; rerun calibrate_latent"
        )
    target_rows = np.unique(np.concatenate([data.rows_of(label) for label in train_labels] or [np.zeros(0, np.int64)]))
    mode = latent["cache"]
    if mode == "auto" and draws < target_rows.size:
        # A cache costs one extraction per training cell; a short run that draws fewer cells
        # than that is cheaper on the fly.
        log.info("feature cache skipped: %d cell draws < %d training cells", draws, target_rows.size)
        mode = "off"
    source = make_latent_source(
        mode,
        extractor,
        request.processed_h5ad,
        target_rows,
        Path(request.resume_dir) / FEATURE_CACHE_DIR,
        float(latent["cache_max_gb"]),
        dist=dist,
    )
    meta = {key: stats.metadata.get(key) for key in ("model_id", "genes_hash", "n_cells")}
    return scgpt_latent_targets(source, stats, device), extractor.dim, meta
