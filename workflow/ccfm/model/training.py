"""Training CCFM: the ``train_ccfm`` rule's entry points, built from the pieces of the loop.

A run reads a :class:`~ccfm.model.request.TrainRequest` (files and config sections), builds the
denoiser (:func:`build_denoiser`) and, for the anchored flow, the mean model (:func:`fit_mean_model`),
wires the latent targets (:mod:`ccfm.model.latent_targets`), fingerprints the run
(:mod:`ccfm.model.fingerprint`) and runs the loop (:mod:`ccfm.model.trainer`, fed by
:mod:`ccfm.model.batches`). :func:`train_rule` is the rule's one call: ``train.gpus`` > 1 runs
:func:`train_from_files` in torchrun workers (:mod:`ccfm.model.launch`). The final ``model.pt``
carries the model config, gene list and perturbation vocabulary, so prediction needs nothing else.

The names of the pieces are re-exported here, so ``from ccfm.model.training import Trainer`` keeps working.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ccfm import CONTROL_LABEL
from ccfm.config import section_defaults, settings_from
from ccfm.data.perturbations import PerturbationVocab
from ccfm.data.validation import check_batch_size
from ccfm.distributed import DistContext, pick_device
from ccfm.io.splits import read_split
from ccfm.model.batches import Batch, LatentTargets, PerturbationBatchSampler
from ccfm.model.checkpoint import save_model
from ccfm.model.denoiser import CascadedDenoiser, FlowSettings
from ccfm.model.expression import ExpressionData, label_means, load_expression
from ccfm.model.fingerprint import (
    fingerprint,
    input_identity,
    mismatch_reason,
    part_hashes,
    run_fingerprint,
    run_fingerprint_parts,
)
from ccfm.model.latent_targets import FEATURE_CACHE_DIR, scgpt_latent_targets, scgpt_targets
from ccfm.model.launch import train_distributed
from ccfm.model.mean_model import MeanModel, MeanModelSettings, build_mean_model
from ccfm.model.model import CascadedFlowModel, ModelConfig
from ccfm.model.request import TrainRequest
from ccfm.model.trainer import (
    CHECKPOINT_NAME,
    LOSS_COLUMNS,
    ResumePoint,
    Trainer,
    TrainingSet,
    TrainResult,
    TrainSettings,
    warmup_cosine,
    write_loss_tsv,
)

__all__ = [
    "CHECKPOINT_NAME",
    "FEATURE_CACHE_DIR",
    "LOSS_COLUMNS",
    "Batch",
    "LatentTargets",
    "PerturbationBatchSampler",
    "ResumePoint",
    "TrainRequest",
    "TrainResult",
    "TrainSettings",
    "Trainer",
    "TrainingSet",
    "build_denoiser",
    "fingerprint",
    "fit_mean_model",
    "input_identity",
    "mismatch_reason",
    "part_hashes",
    "run_fingerprint",
    "run_fingerprint_parts",
    "scgpt_latent_targets",
    "scgpt_targets",
    "train_distributed",
    "train_from_files",
    "train_rule",
    "warmup_cosine",
    "write_loss_tsv",
]

log = logging.getLogger(__name__)


def build_denoiser(
    n_genes: int,
    model_section: Mapping[str, Any],
    train_section: Mapping[str, Any],
    latent_dim: int,
    vocab: PerturbationVocab,
    seed: int,
    *,
    mean_settings: MeanModelSettings | None = None,
) -> CascadedDenoiser:
    """Seeded construction of the denoiser from config sections (``latent_dim=0``: no latent).

    ``model.anchor: additive`` (the default) makes the expression flow start from the anchored
    control cell with a zero-initialised expression head; ``none`` is the plan's Gaussian flow.
    ``mean_settings``: the run's mean-model settings when the caller has built them already.
    """
    if mean_settings is None:
        mean_settings = MeanModelSettings.from_sections(model_section, train_section)
    anchored = mean_settings.anchor == "additive"
    config = settings_from(
        ModelConfig,
        "model",
        model_section,
        n_genes=n_genes,
        latent_dim=latent_dim,
        perturbation_type=vocab.kind,
        n_drugs=vocab.n_drugs,
        n_unmeasured_genes=vocab.n_unmeasured,
        zero_init_expr_head=anchored,
    )
    torch.manual_seed(seed)
    flow = settings_from(FlowSettings, "train", train_section, source="control" if anchored else "gaussian")
    return CascadedDenoiser(CascadedFlowModel(config), flow)


def fit_mean_model(
    data: ExpressionData,
    train_labels: Sequence[str],
    settings: MeanModelSettings,
    seed: int,
    control_label: str = CONTROL_LABEL,
    coexpression_cells: int = 2000,
) -> MeanModel:
    """The anchored flow's mean model from the training cells (see :mod:`ccfm.model.mean_model`)."""
    means, noise = label_means(data, [*train_labels, control_label])
    if control_label not in means:
        raise ValueError(f"no control cells labelled {control_label!r} in the processed data")
    control_mean = means.pop(control_label)
    noise["__control__"] = noise.pop(control_label)
    control_rows = data.rows_of(control_label)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x6D65616E])  # 'mean': its own stream of the run seed
    sample = np.sort(rng.choice(control_rows, size=min(coexpression_cells, control_rows.size), replace=False))
    model, _ = build_mean_model(
        data.genes, control_mean, means, data.dense_rows(sample), settings, seed, mean_noise_var=noise
    )
    log.info(
        "mean model: %d singles with observed effects, interaction learner %r", len(model.singles), settings.interaction
    )
    return model


def train_rule(request: TrainRequest, processes: int, threads: int, log_path: str | Path | None) -> None:
    """The ``train_ccfm`` rule: ``processes`` > 1 trains in that many torchrun workers, otherwise here."""
    if processes > 1:
        train_distributed(processes, log_path, request, threads_per_process=max(1, threads // processes))
    else:
        torch.set_num_threads(threads)
        train_from_files(request)


def train_from_files(
    request: TrainRequest,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    dist: DistContext | None = None,
) -> TrainResult:
    """Everything the ``train_ccfm`` rule does: data, optional scGPT targets, loop, outputs.

    In a multi-process run (``dist`` from :func:`ccfm.distributed.init_from_env`) every rank
    calls this; only rank 0 writes the model and the loss log.
    """
    split = read_split(request.split_json)
    train_labels = [str(label) for label in split["train"]]
    # Held-out cells are never drawn in training: not reading them saves their share of X.
    data = load_expression(request.processed_h5ad, keep_labels=[*train_labels, CONTROL_LABEL])
    settings = TrainSettings.from_train_section(request.train_section)
    # Checked by the split rule too; again here for a batch size changed after the split.
    check_batch_size(
        pd.Series(data.labels).value_counts().to_dict(),
        train_labels,
        settings.batch_size,
        f"{request.processed_h5ad} (split {request.split_json})",
        log,
    )
    device = _training_device(request.train_section, device, dist)
    vocab = _perturbation_vocab(request, data.genes, train_labels, split["test"])
    latent_targets: LatentTargets | None = None
    latent_dim = 0
    stats_meta: dict[str, Any] = {}
    if request.use_latent:
        latent_targets, latent_dim, stats_meta = scgpt_targets(
            request, data, train_labels, device, draws=settings.steps * settings.batch_size, dist=dist
        )
    seed = request.seed
    mean_settings = MeanModelSettings.from_sections(request.model_section, request.train_section)
    denoiser = build_denoiser(
        data.n_genes, request.model_section, request.train_section, latent_dim, vocab, seed, mean_settings=mean_settings
    )
    mean_model = fit_mean_model(data, train_labels, mean_settings, seed) if mean_settings.anchor == "additive" else None
    n_params = sum(p.numel() for p in denoiser.parameters())
    log.info(
        "model: %d parameters, latent stream %s (D=%d), %d genes, %d training perturbations",
        *(n_params, "on" if latent_dim else "off", latent_dim, data.n_genes, len(train_labels)),
    )
    parts = run_fingerprint_parts(
        settings, denoiser, vocab, train_labels, seed, {**_input_identity(request), "mean": mean_settings.to_dict()}
    )
    trainer = Trainer(
        denoiser,
        TrainingSet(data, train_labels, vocab, latent_targets, mean_model),
        settings,
        ResumePoint(request.resume_dir, fingerprint(parts), part_hashes(parts)),
        seed=seed,
        device=device,
        dist=dist,
    )
    result = trainer.run(progress=progress)
    _log_result(result, trainer)
    if not trainer.dist.is_main:
        return result
    write_loss_tsv(result.history, request.out_loss)
    metadata = {
        "seed": seed,
        "steps": settings.steps,
        "train_labels": train_labels,
        "latent": bool(latent_dim),
        "latent_stats": stats_meta,
        "n_parameters": n_params,
        "anchor": mean_settings.anchor,
        "interaction": mean_settings.interaction if mean_model is not None else "off",
    }
    save_model(request.out_model, trainer.denoiser, vocab, metadata, mean_model=mean_model)
    trainer.remove_checkpoint()
    return result


def _training_device(
    train_section: Mapping[str, Any], device: str | torch.device | None, dist: DistContext | None
) -> torch.device:
    """The process's device in a multi-process run, else the one asked for, else ``train.gpus``' pick."""
    if dist is not None and dist.distributed:
        return dist.device
    if device is not None:
        return torch.device(device)
    return pick_device(int({**section_defaults("train"), **train_section}["gpus"]))


def _perturbation_vocab(
    request: TrainRequest, genes: Sequence[str], train_labels: Sequence[str], test_labels: Sequence[str]
) -> PerturbationVocab:
    """Every label the model must embed: training, held-out and the dataset's ``predict:`` labels."""
    if request.perturbation_type == "drug":
        return PerturbationVocab.for_drugs(genes, [*train_labels, *test_labels, *request.extra_labels])
    return PerturbationVocab.for_genes(
        genes,
        train_labels,
        [*test_labels, *request.extra_labels],
        where=f"{request.split_json} and the dataset's 'predict:'",
    )


def _input_identity(request: TrainRequest) -> dict[str, Any]:
    return input_identity(
        request.processed_h5ad,
        request.split_json,
        use_latent=request.use_latent,
        latent_section=request.latent_section,
        latent_stats=request.latent_stats,
        gene_vocab_tsv=request.gene_vocab_tsv,
        scgpt_dir=request.scgpt_dir,
    )


def _log_result(result: TrainResult, trainer: Trainer) -> None:
    log.info(
        "trained %d steps (resumed from %d) in %.1f s, %.1f%% in scGPT feature extraction",
        result.steps_run,
        result.resumed_from,
        result.seconds,
        100 * result.extract_seconds / max(result.seconds, 1e-9),
    )
    if trainer.device.type == "cuda":
        log.info("peak GPU memory: %.2f GiB", torch.cuda.max_memory_allocated(trainer.device) / 2**30)
