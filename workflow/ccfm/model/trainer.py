"""The CCFM training loop: AdamW, warmup-cosine schedule, minibatch OT coupling, resumable checkpoints.

AdamW, linear warmup then cosine decay, gradient clipping, bf16 autocast on CUDA only. Every
``checkpoint_every`` steps the full training state (model, optimiser, scheduler, every RNG, the
loss history) is written atomically to ``resume/checkpoint.pt``; a rerun of the same
configuration (:mod:`ccfm.model.fingerprint`) continues from there, and on CPU the result is
bit-identical to an uninterrupted run. A checkpoint of another run is discarded with a log line
naming what changed, and a finished run's checkpoint is removed once ``model.pt`` is written.
Everything is loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from tqdm.auto import tqdm

from ccfm import CONTROL_LABEL
from ccfm.config import section_defaults, settings_from
from ccfm.data.perturbations import PerturbationVocab
from ccfm.distributed import DistContext, gather_rows, sum_over_ranks
from ccfm.io.atomic import write_binary_atomic, write_table_atomic
from ccfm.model.batches import Batch, LatentTargets, PerturbationBatchSampler
from ccfm.model.denoiser import BatchShard, CascadedDenoiser
from ccfm.model.expression import ExpressionData
from ccfm.model.fingerprint import mismatch_reason
from ccfm.model.mean_model import MeanModel

log = logging.getLogger(__name__)

LOSS_COLUMNS = ("step", "total", "expr", "latent", "mmd", "lr")
CHECKPOINT_NAME = "checkpoint.pt"

_TRAIN = section_defaults("train")


@dataclass
class TrainSettings:
    """The loop's knobs, from the merged ``train`` config section."""

    steps: int = _TRAIN["steps"]
    batch_size: int = _TRAIN["batch_size"]
    lr: float = _TRAIN["lr"]
    weight_decay: float = _TRAIN["weight_decay"]
    warmup_steps: int = _TRAIN["warmup_steps"]
    grad_clip: float = _TRAIN["grad_clip"]
    infer_top_gene: int = _TRAIN["infer_top_gene"]
    checkpoint_every: int = _TRAIN["checkpoint_every"]
    log_every: int = _TRAIN["log_every"]
    eta_min: float = _TRAIN["eta_min"]  # floor of the cosine schedule (scDFM)
    bf16: bool = _TRAIN["bf16"]  # autocast on CUDA only

    @classmethod
    def from_train_section(cls, train: Mapping[str, Any]) -> TrainSettings:
        return settings_from(cls, "train", train)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    history: list[list[float]]  # rows of LOSS_COLUMNS
    resumed_from: int
    steps_run: int
    seconds: float
    extract_seconds: float  # time inside the latent-target callable (scGPT)


@dataclass(frozen=True)
class TrainingSet:
    """What the loop learns from: the cells, the perturbations trained on, their vocabulary, the
    latent targets (scGPT features) of a latent run and the mean model of an anchored flow."""

    data: ExpressionData
    train_labels: Sequence[str]
    vocab: PerturbationVocab
    latent_targets: LatentTargets | None = None
    mean_model: MeanModel | None = None
    control_label: str = CONTROL_LABEL


@dataclass(frozen=True)
class ResumePoint:
    """Where the run checkpoints (``resume_dir/checkpoint.pt``) and which run a checkpoint must
    belong to: its fingerprint and the per-part hashes that name what changed
    (:func:`ccfm.model.fingerprint.part_hashes`)."""

    resume_dir: str | Path
    fingerprint: str = ""
    fingerprint_parts: Mapping[str, str] = field(default_factory=dict)


class Trainer:
    """Runs (and resumes) the loop for one model; see the module docstring."""

    def __init__(
        self,
        denoiser: CascadedDenoiser,
        training: TrainingSet,
        settings: TrainSettings,
        resume: ResumePoint,
        *,
        seed: int,
        device: str | torch.device = "cpu",
        dist: DistContext | None = None,
    ) -> None:
        data, latent_targets = training.data, training.latent_targets
        if denoiser.latent_enabled and latent_targets is None:
            raise ValueError("the model has a latent stream but no latent_targets were given (scGPT features)")
        self.dist = dist or DistContext(device=torch.device(device))
        if self.dist.distributed:
            device = self.dist.device
            # Fail before any work if the global batch cannot be split evenly.
            self.dist.shard(settings.batch_size)
        self.denoiser = denoiser.to(device)
        # The module whose call computes the loss: DDP syncs gradients of the ranks in backward.
        self.loss_module: torch.nn.Module = self.denoiser
        if self.dist.distributed:
            self.loss_module = torch.nn.parallel.DistributedDataParallel(
                self.denoiser, device_ids=[device] if torch.device(device).type == "cuda" else None
            )
        self.data = data
        self.vocab = training.vocab
        self.settings = settings
        self.seed = seed
        self.device = torch.device(device)
        self.resume_path = Path(resume.resume_dir) / CHECKPOINT_NAME
        self.latent_targets = latent_targets if denoiser.latent_enabled else None
        self.run_fingerprint = resume.fingerprint
        # Per-part hashes (:func:`ccfm.model.fingerprint.part_hashes`): saved so a later mismatch names what changed.
        self.fingerprint_parts = dict(resume.fingerprint_parts)
        # Anchored flow: each label's predicted mean shift (fixed during training), cached.
        self.mean_model = training.mean_model
        self._anchor_cache: dict[str, np.ndarray | None] = {}
        self.np_rng = np.random.default_rng(seed)
        flow = denoiser.settings
        anchored = flow.source == "control"
        self.sampler = PerturbationBatchSampler(
            data,
            training.train_labels,
            settings.batch_size,
            settings.infer_top_gene,
            self.np_rng,
            training.control_label,
            separate_starts=anchored and flow.condition_cell == "separate",
        )
        self.ot_coupling = anchored and flow.coupling == "ot"
        self.torch_gen = torch.Generator(device=self.device).manual_seed(seed)
        self.optimizer = torch.optim.AdamW(denoiser.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        min_ratio = min(1.0, settings.eta_min / settings.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(step, settings.warmup_steps, settings.steps, min_ratio)
        )
        self.step = 0
        self.history: list[list[float]] = []
        self._pending: list[list[float]] = []  # per-step losses since the last log row
        self.extract_seconds = 0.0
        # Set to [] to record the target-cell rows this process trains on at each step (tests
        # check that ranks see disjoint shards); off by default, it grows with the steps.
        self.rows_seen: list[np.ndarray] | None = None

    # -- checkpoints -------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "fingerprint": self.run_fingerprint,
            "fingerprint_parts": self.fingerprint_parts,
            "step": self.step,
            "model": self.denoiser.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "np_rng": json.dumps(self.np_rng.bit_generator.state),
            "torch_gen": self.torch_gen.get_state(),
            "torch_cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "history": self.history,
            "pending": self._pending,
        }

    def save_checkpoint(self) -> None:
        """Rank 0 writes (all ranks hold the same state); the others wait until it is in place."""
        if self.dist.is_main:
            write_binary_atomic(self.resume_path, functools.partial(torch.save, self._state()))
            log.info("checkpoint at step %d -> %s", self.step, self.resume_path)
        self.dist.barrier()

    def try_resume(self) -> int:
        """Load ``resume/checkpoint.pt`` if it belongs to this run; return the step reached."""
        if not self.resume_path.exists():
            return 0
        state = torch.load(self.resume_path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.run_fingerprint:
            log.warning(
                "discarding %s (step %s): %s; training starts from step 0",
                self.resume_path,
                state.get("step"),
                mismatch_reason(state, self.run_fingerprint, self.fingerprint_parts),
            )
            return 0
        self.denoiser.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.np_rng.bit_generator.state = json.loads(state["np_rng"])
        self.torch_gen.set_state(state["torch_gen"])
        torch.set_rng_state(state["torch_cpu_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.history = [list(row) for row in state["history"]]
        self._pending = [list(row) for row in state["pending"]]
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", self.resume_path, self.step)
        return self.step

    def remove_checkpoint(self) -> None:
        """Delete the resume checkpoint once ``model.pt`` is written (rank 0; idempotent).

        A finished run's checkpoint would otherwise be resumed by the next run of the rule
        (``--forcerun``, new inputs) at its last step: zero steps trained, the old model written
        again. The feature cache beside it is kept: its manifest decides its reuse.
        """
        if self.dist.is_main:
            self.resume_path.unlink(missing_ok=True)
            log.info("training complete: removed %s", self.resume_path)

    # -- one step ----------------------------------------------------------------------------

    def anchor_shift(self, label: str) -> np.ndarray | None:
        """The mean model's predicted shift (G,) of ``label``; None when it has no anchor."""
        if self.mean_model is None:
            return None
        if label not in self._anchor_cache:
            shift = self.mean_model.delta(label)
            self._anchor_cache[label] = None if shift is None else shift.numpy().astype(np.float32)
        return self._anchor_cache[label]

    def _tensors(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        window = batch.gene_window
        target_full = self.data.dense_rows(batch.target_rows)
        source = self.data.dense_rows(batch.control_rows)[:, window]
        x_start = None
        if self.denoiser.settings.source == "control":
            start = source if batch.start_rows is None else self.data.dense_rows(batch.start_rows)[:, window]
            x_start = torch.from_numpy(self._anchored(start, batch)).to(self.device)
        z_target = None
        if self.latent_targets is not None:
            started = time.perf_counter()
            # Features come from the *whole* target cell (scGPT sees its full context), then the window.
            z_target = self.latent_targets(batch.target_rows, target_full)[:, torch.as_tensor(window)]
            self.extract_seconds += time.perf_counter() - started
            z_target = z_target.to(self.device, torch.float32)
        gene_ids = torch.as_tensor(window, device=self.device).expand(len(batch.target_rows), -1)
        pert_ids = self.vocab.batch_ids([batch.label] * len(batch.target_rows)).to(self.device)
        target = torch.from_numpy(target_full[:, window]).to(self.device)
        return gene_ids, torch.from_numpy(source).to(self.device), target, pert_ids, z_target, x_start

    def _anchored(self, start: np.ndarray, batch: Batch) -> np.ndarray:
        """Starting cells (B, window) moved by the label's predicted shift (unmoved without one)."""
        shift = self.anchor_shift(batch.label)
        return start if shift is None else start + shift[batch.gene_window]

    def _couple(self, batch: Batch) -> Batch:
        """Minibatch OT: reorder the starting cells so start i goes to target i at least total cost.

        The cost is the squared Euclidean distance over the batch's gene window between the
        anchored starting cells and the target cells; the global batch is coupled before it is
        sharded, so every process sees the same pairs.
        """
        window = batch.gene_window
        starts = batch.starts
        start = self._anchored(self.data.dense_rows(starts)[:, window], batch).astype(np.float64)
        target = self.data.dense_rows(batch.target_rows)[:, window].astype(np.float64)
        cost = ((target[:, None, :] - start[None, :, :]) ** 2).sum(axis=-1)
        _, order = linear_sum_assignment(cost)
        if batch.start_rows is None:  # the start cells are the network's control input too
            return Batch(batch.label, batch.target_rows, starts[order], window)
        return Batch(batch.label, batch.target_rows, batch.control_rows, window, starts[order])

    def _local_part(self, batch: Batch) -> tuple[Batch, BatchShard]:
        """This process's contiguous slice of the global batch (all of it in a single process)."""
        total = len(batch.target_rows)
        if not self.dist.distributed:
            return batch, BatchShard.whole(total)
        rows = self.dist.shard(total)
        starts = None if batch.start_rows is None else batch.start_rows[rows]
        local = Batch(batch.label, batch.target_rows[rows], batch.control_rows[rows], batch.gene_window, starts)
        return local, BatchShard(rows.start, rows.stop, total, self.dist.world_size, gather_rows)

    def train_step(self) -> dict[str, float]:
        self.denoiser.train()
        # Every rank draws the same global batch (same sampler state), then keeps its own shard.
        batch = self.sampler.sample()
        if self.ot_coupling:
            batch = self._couple(batch)
        local, shard = self._local_part(batch)
        if self.rows_seen is not None:
            self.rows_seen.append(local.target_rows)
        gene_ids, source, target, pert_ids, z_target, x_start = self._tensors(local)
        use_bf16 = self.settings.bf16 and self.device.type == "cuda"
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            losses = self.loss_module(gene_ids, source, target, pert_ids, z_target, self.torch_gen, shard, x_start)
        self.optimizer.zero_grad(set_to_none=True)
        # The shares sum to the global loss over ranks and DDP averages gradients: scale back by
        # the world size so the update equals the single-process one.
        (losses["total"] * shard.world_size).backward()
        torch.nn.utils.clip_grad_norm_(self.denoiser.parameters(), self.settings.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        names = list(losses)
        shares = [float(losses[name].detach()) for name in names]
        values = dict(zip(names, sum_over_ranks(shares, self.device) if self.dist.distributed else shares))
        if not math.isfinite(values["total"]):
            raise FloatingPointError(
                f"training loss became {values['total']} at step {self.step}; lower train.lr or raise train.grad_clip"
            )
        values["lr"] = lr
        return values

    def _log_row(self) -> None:
        if not self._pending:
            return
        means = np.mean(np.asarray(self._pending, dtype=np.float64), axis=0).tolist()
        self.history.append([float(self.step), *means])
        self._pending = []

    def run(self, stop_at_step: int | None = None, progress: bool = True) -> TrainResult:
        """Train to ``settings.steps`` (or stop early at ``stop_at_step``, as a killed job would)."""
        started = time.perf_counter()
        resumed = self.try_resume()
        last = self.settings.steps if stop_at_step is None else min(stop_at_step, self.settings.steps)
        bar = tqdm(
            total=self.settings.steps,
            initial=self.step,
            desc="train_ccfm",
            disable=not (progress and self.dist.is_main),
            mininterval=5.0,
        )
        while self.step < last:
            values = self.train_step()
            self._pending.append([values[name] for name in LOSS_COLUMNS[1:]])
            if self.step % self.settings.log_every == 0 or self.step == self.settings.steps:
                self._log_row()
                bar.set_postfix(loss=f"{self.history[-1][1]:.4f}")
            if self.step % self.settings.checkpoint_every == 0 and self.step < self.settings.steps:
                self.save_checkpoint()
            bar.update(1)
        bar.close()
        if self.step == self.settings.steps:
            self.save_checkpoint()
        return TrainResult(
            self.history, resumed, self.step - resumed, time.perf_counter() - started, self.extract_seconds
        )


def write_loss_tsv(history: Sequence[Sequence[float]], path: str | Path) -> None:
    """Loss log, columns :data:`LOSS_COLUMNS`, written atomically."""
    frame = pd.DataFrame([list(row) for row in history], columns=list(LOSS_COLUMNS))
    frame["step"] = frame["step"].astype(int)
    write_table_atomic(frame, path, sep="\t", index=False, float_format="%.6g")
