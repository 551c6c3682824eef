"""Training CCFM: data sampling, the optimisation loop and resumable checkpoints.

Data (as scDFM): each step takes the cells of one training perturbation (targets) and as many
randomly drawn control cells (sources, *unpaired*), over a random window of
``infer_top_gene`` genes. Latent models also get the target cells' frozen scGPT features,
normalised with the fold's calibrated statistics, from a :data:`LatentTargets` callable.

Loop: AdamW, linear warmup then cosine decay, gradient clipping, bf16 autocast on CUDA only.
Every ``checkpoint_every`` steps the full training state (model, optimiser, scheduler, every RNG,
the loss history) is written atomically to ``resume/checkpoint.pt``; a rerun of the same
configuration continues from there, and on CPU the result is bit-identical to an uninterrupted
run. "Same configuration" is the run fingerprint: settings, genes, labels, seed and the identity
of every input (data, split, latent stats, scGPT checkpoint, latent settings); a checkpoint of
another run is discarded with a log line naming what changed, and a finished run's checkpoint is
removed once ``model.pt`` is written, so a rerun trains from step 0. The final ``model.pt``
carries the model config, gene list and perturbation vocabulary, so prediction needs nothing else.
Everything is loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
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
from ccfm.data.validation import check_batch_size
from ccfm.distributed import DistContext, gather_rows, pick_device, sum_over_ranks
from ccfm.io.h5ad import atomic_output, file_identity
from ccfm.io.splits import read_split
from ccfm.model.checkpoint import atomic_torch_save, save_model
from ccfm.model.denoiser import BatchShard, CascadedDenoiser, FlowSettings
from ccfm.model.expression import ExpressionData, label_means, load_expression
from ccfm.model.mean_model import MeanModel, MeanModelSettings, build_mean_model
from ccfm.model.model import CascadedFlowModel, ModelConfig

log = logging.getLogger(__name__)

LOSS_COLUMNS = ("step", "total", "expr", "latent", "mmd", "lr")
CHECKPOINT_NAME = "checkpoint.pt"

# (target cell rows (B,), their full log1p expression (B, G_all)) -> normalised features (B, G_all, D).
LatentTargets = Callable[[np.ndarray, np.ndarray], Tensor]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One training step's cells: a single perturbation vs unpaired control cells."""

    label: str
    target_rows: np.ndarray
    control_rows: np.ndarray  # the network's control-cell input
    gene_window: np.ndarray  # sorted gene indices
    # Control cells the anchored flow starts from; None: the same cells as ``control_rows``.
    start_rows: np.ndarray | None = None

    @property
    def starts(self) -> np.ndarray:
        return self.control_rows if self.start_rows is None else self.start_rows


class PerturbationBatchSampler:
    """Draws :class:`Batch` es from a seeded numpy Generator (state saved in checkpoints)."""

    def __init__(
        self,
        data: ExpressionData,
        train_labels: Sequence[str],
        batch_size: int,
        window: int,
        rng: np.random.Generator,
        control_label: str = CONTROL_LABEL,
        separate_starts: bool = False,
    ) -> None:
        self.data = data
        self.separate_starts = separate_starts
        self.batch_size = batch_size
        self.window = min(window, data.n_genes)
        self.rng = rng
        self.control_rows = data.rows_of(control_label)
        if self.control_rows.size == 0:
            raise ValueError(f"no control cells labelled {control_label!r} in the processed data")
        self.rows = {label: data.rows_of(label) for label in train_labels}
        empty = [label for label, rows in self.rows.items() if rows.size == 0]
        if empty:
            log.warning("%d training perturbation(s) have no cells and are skipped: %s", len(empty), empty[:10])
        self.labels = sorted(label for label, rows in self.rows.items() if rows.size > 0 and label != control_label)
        if not self.labels:
            raise ValueError("no training perturbation has cells; check the split file against processed.h5ad")

    def _draw(self, rows: np.ndarray) -> np.ndarray:
        return self.rng.choice(rows, size=self.batch_size, replace=rows.size < self.batch_size)

    def sample(self) -> Batch:
        label = self.labels[int(self.rng.integers(len(self.labels)))]
        targets = self._draw(self.rows[label])
        controls = self._draw(self.control_rows)
        window = np.sort(self.rng.permutation(self.data.n_genes)[: self.window])
        starts = self._draw(self.control_rows) if self.separate_starts else None
        return Batch(label, targets, controls, window, starts)


# --------------------------------------------------------------------------------------------
# Settings, model construction, saving
# --------------------------------------------------------------------------------------------


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


def build_denoiser(
    n_genes: int,
    model_section: Mapping[str, Any],
    train_section: Mapping[str, Any],
    latent_dim: int,
    vocab: PerturbationVocab,
    seed: int,
) -> CascadedDenoiser:
    """Seeded construction of the denoiser from config sections (``latent_dim=0``: no latent).

    ``model.anchor: additive`` (the default) makes the expression flow start from the anchored
    control cell with a zero-initialised expression head; ``none`` is the plan's Gaussian flow.
    """
    anchored = MeanModelSettings.from_sections(model_section, train_section).anchor == "additive"
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


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def fingerprint(parts: Mapping[str, Any]) -> str:
    """Stable hash of what defines a training run (a checkpoint of another run is not resumed)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def part_hashes(parts: Mapping[str, Any]) -> dict[str, str]:
    """One short hash per part: stored in checkpoints so a mismatch can say *what* changed."""
    return {str(name): fingerprint({"value": value}) for name, value in parts.items()}


def _content_hash(path: Path) -> str:
    """sha256 of a small file (split JSON, latent stats, gene vocab, scGPT args/vocab)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def input_identity(
    processed_h5ad: str | Path,
    split_json: str | Path,
    *,
    use_latent: bool,
    latent_section: Mapping[str, Any] | None = None,
    latent_stats: str | Path | None = None,
    gene_vocab_tsv: str | Path | None = None,
    scgpt_dir: str | Path | None = None,
) -> dict[str, Any]:
    """What a training run reads, as fingerprint parts (see :func:`run_fingerprint`).

    ``processed.h5ad`` and the scGPT weights can be many GB, so they are identified by size and
    nanosecond mtime (:func:`ccfm.io.h5ad.file_identity`); the small files by their content. The
    latent settings and files only enter for a latent run: the plain variant does not read them,
    and a new calibration must not throw away its checkpoint.
    """
    identity: dict[str, Any] = {
        "processed.h5ad": file_identity(processed_h5ad),
        "split": _content_hash(Path(split_json)),
    }
    if use_latent:
        if latent_stats is None or gene_vocab_tsv is None or scgpt_dir is None:
            raise ValueError("a latent run's identity needs latent_stats, gene_vocab_tsv and scgpt_dir")
        scgpt = Path(scgpt_dir)
        identity.update(
            {
                "latent section": dict(latent_section or {}),
                "latent_stats.pt": _content_hash(Path(latent_stats)),
                "gene_vocab.tsv": _content_hash(Path(gene_vocab_tsv)),
                "scGPT checkpoint": [
                    file_identity(scgpt / "best_model.pt"),
                    _content_hash(scgpt / "args.json"),
                    _content_hash(scgpt / "vocab.json"),
                ],
            }
        )
    return identity


@dataclass
class TrainResult:
    history: list[list[float]]  # rows of LOSS_COLUMNS
    resumed_from: int
    steps_run: int
    seconds: float
    extract_seconds: float  # time inside the latent-target callable (scGPT)


class Trainer:
    """Runs (and resumes) the loop for one model; see the module docstring."""

    def __init__(
        self,
        denoiser: CascadedDenoiser,
        data: ExpressionData,
        train_labels: Sequence[str],
        vocab: PerturbationVocab,
        settings: TrainSettings,
        seed: int,
        resume_dir: str | Path,
        latent_targets: LatentTargets | None = None,
        device: str | torch.device = "cpu",
        run_fingerprint: str = "",
        control_label: str = CONTROL_LABEL,
        dist: DistContext | None = None,
        fingerprint_parts: Mapping[str, str] | None = None,
        mean_model: MeanModel | None = None,
    ) -> None:
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
        self.vocab = vocab
        self.settings = settings
        self.seed = seed
        self.device = torch.device(device)
        self.resume_path = Path(resume_dir) / CHECKPOINT_NAME
        self.latent_targets = latent_targets if denoiser.latent_enabled else None
        self.run_fingerprint = run_fingerprint
        # Per-part hashes (:func:`part_hashes`): saved so a later mismatch names what changed.
        self.fingerprint_parts = dict(fingerprint_parts or {})
        # Anchored flow: each label's predicted mean shift (fixed during training), cached.
        self.mean_model = mean_model
        self._anchor_cache: dict[str, np.ndarray | None] = {}
        self.np_rng = np.random.default_rng(seed)
        flow = denoiser.settings
        anchored = flow.source == "control"
        self.sampler = PerturbationBatchSampler(
            data,
            train_labels,
            settings.batch_size,
            settings.infer_top_gene,
            self.np_rng,
            control_label,
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
            atomic_torch_save(self._state(), self.resume_path)
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
                self._mismatch_reason(state),
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

    def _mismatch_reason(self, state: Mapping[str, Any]) -> str:
        """Which fingerprint parts differ between a checkpoint and this run, in words."""
        saved = state.get("fingerprint_parts") or {}
        changed = sorted(
            name
            for name in set(saved) | set(self.fingerprint_parts)
            if saved.get(name) != self.fingerprint_parts.get(name)
        )
        if saved and changed:
            return "it belongs to another run: changed since it was written: " + ", ".join(changed)
        return (
            f"it belongs to another run (fingerprint {state.get('fingerprint')} != {self.run_fingerprint}; "
            "written by an older version or another configuration)"
        )

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
    with atomic_output(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False, float_format="%.6g")


def run_fingerprint_parts(
    settings: TrainSettings,
    denoiser: CascadedDenoiser,
    vocab: PerturbationVocab,
    train_labels: Sequence[str],
    seed: int,
    inputs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything that changes a training run's result, by name (``inputs``: :func:`input_identity`)."""
    return {
        "train": asdict(settings),
        "flow": denoiser.settings.to_dict(),
        "model": denoiser.model.config.to_dict(),
        "genes": vocab.genes,
        "drugs": vocab.drugs,
        "train_labels": sorted(train_labels),
        "seed": seed,
        **dict(inputs or {}),
    }


def run_fingerprint(
    settings: TrainSettings,
    denoiser: CascadedDenoiser,
    vocab: PerturbationVocab,
    train_labels: Sequence[str],
    seed: int,
    inputs: Mapping[str, Any] | None = None,
) -> str:
    """Fingerprint of a training run for :meth:`Trainer.try_resume`."""
    return fingerprint(run_fingerprint_parts(settings, denoiser, vocab, train_labels, seed, inputs))


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


# --------------------------------------------------------------------------------------------
# Wiring for the train_ccfm rule
# --------------------------------------------------------------------------------------------


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


def train_distributed(
    n_processes: int, log_path: str | Path | None, threads_per_process: int = 1, **train_kwargs: Any
) -> None:
    """Run :func:`train_from_files` in ``n_processes`` torchrun workers (``train.gpus`` > 1).

    The keyword arguments travel as a JSON request file in the resume directory (no pickle, no
    shell string); rank 0 writes the outputs as in a single-process run.
    """
    from ccfm.distributed import launch

    request = {**train_kwargs, "threads_per_process": int(threads_per_process)}
    request_json = Path(train_kwargs["resume_dir"]) / "launch.json"
    with atomic_output(request_json) as tmp:
        tmp.write_text(json.dumps(request, indent=2, default=str))  # default=str: paths as strings
    launch(n_processes, request_json, log_path)


def train_rule(
    processes: int,
    threads: int,
    log_path: str | Path | None,
    *,
    scgpt_model: str | Path | None = None,
    **train_kwargs: Any,
) -> None:
    """The ``train_ccfm`` rule: ``processes`` > 1 trains in that many torchrun workers, otherwise here.

    ``scgpt_model`` (the checkpoint's ``best_model.pt``) names the scGPT directory of a latent run;
    the other keyword arguments are those of :func:`train_from_files`.
    """
    if scgpt_model is not None:
        train_kwargs["scgpt_dir"] = str(Path(scgpt_model).parent)
    if processes > 1:
        train_distributed(processes, log_path, threads_per_process=max(1, threads // processes), **train_kwargs)
    else:
        torch.set_num_threads(threads)
        train_from_files(**train_kwargs)


def train_from_files(
    processed_h5ad: str | Path,
    split_json: str | Path,
    out_model: str | Path,
    out_loss: str | Path,
    resume_dir: str | Path,
    *,
    model_section: Mapping[str, Any],
    train_section: Mapping[str, Any],
    latent_section: Mapping[str, Any],
    seed: int,
    use_latent: bool,
    scgpt_dir: str | Path | None = None,
    gene_vocab_tsv: str | Path | None = None,
    latent_stats: str | Path | None = None,
    perturbation_type: str = "gene",
    extra_labels: Sequence[str] = (),
    device: str | torch.device | None = None,
    progress: bool = True,
    dist: DistContext | None = None,
) -> TrainResult:
    """Everything the ``train_ccfm`` rule does: data, optional scGPT targets, loop, outputs.

    In a multi-process run (``dist`` from :func:`ccfm.distributed.init_from_env`) every rank
    calls this; only rank 0 writes the model and the loss log.
    """
    split = read_split(split_json)
    train_labels = [str(label) for label in split["train"]]
    # Held-out cells are never drawn in training: not reading them saves their share of X.
    data = load_expression(processed_h5ad, keep_labels=[*train_labels, CONTROL_LABEL])
    settings = TrainSettings.from_train_section(train_section)
    # Checked by the split rule too; again here for a batch size changed after the split.
    check_batch_size(
        pd.Series(data.labels).value_counts().to_dict(),
        train_labels,
        settings.batch_size,
        f"{processed_h5ad} (split {split_json})",
        log,
    )
    if dist is not None and dist.distributed:
        device = dist.device
    elif device is not None:
        device = torch.device(device)
    else:
        device = pick_device(int(train_section.get("gpus", 1)))
    if perturbation_type == "drug":
        vocab = PerturbationVocab.for_drugs(data.genes, [*train_labels, *split["test"], *extra_labels])
    else:
        vocab = PerturbationVocab.for_genes(
            data.genes,
            train_labels,
            [*split["test"], *extra_labels],
            where=f"{split_json} and the dataset's 'predict:'",
        )

    latent_targets: LatentTargets | None = None
    latent_dim = 0
    stats_meta: dict[str, Any] = {}
    if use_latent:
        latent_targets, latent_dim, stats_meta = _scgpt_targets(
            data,
            train_labels,
            scgpt_dir,
            gene_vocab_tsv,
            latent_stats,
            latent_section,
            processed_h5ad,
            resume_dir,
            seed,
            device,
            draws=settings.steps * settings.batch_size,
            dist=dist,
        )
    denoiser = build_denoiser(data.n_genes, model_section, train_section, latent_dim, vocab, seed)
    mean_settings = MeanModelSettings.from_sections(model_section, train_section)
    mean_model = fit_mean_model(data, train_labels, mean_settings, seed) if mean_settings.anchor == "additive" else None
    n_params = sum(p.numel() for p in denoiser.parameters())
    log.info(
        "model: %d parameters, latent stream %s (D=%d), %d genes, %d training perturbations",
        n_params,
        "on" if latent_dim else "off",
        latent_dim,
        data.n_genes,
        len(train_labels),
    )
    identity = input_identity(
        processed_h5ad,
        split_json,
        use_latent=use_latent,
        latent_section=latent_section,
        latent_stats=latent_stats,
        gene_vocab_tsv=gene_vocab_tsv,
        scgpt_dir=scgpt_dir,
    )
    parts = run_fingerprint_parts(
        settings, denoiser, vocab, train_labels, seed, {**identity, "mean": mean_settings.to_dict()}
    )
    trainer = Trainer(
        denoiser,
        data,
        train_labels,
        vocab,
        settings,
        seed,
        resume_dir,
        latent_targets,
        device,
        fingerprint(parts),
        dist=dist,
        fingerprint_parts=part_hashes(parts),
        mean_model=mean_model,
    )
    result = trainer.run(progress=progress)
    log.info(
        "trained %d steps (resumed from %d) in %.1f s, %.1f%% in scGPT feature extraction",
        result.steps_run,
        result.resumed_from,
        result.seconds,
        100 * result.extract_seconds / max(result.seconds, 1e-9),
    )
    if trainer.device.type == "cuda":
        log.info("peak GPU memory: %.2f GiB", torch.cuda.max_memory_allocated(trainer.device) / 2**30)
    if not trainer.dist.is_main:
        return result
    write_loss_tsv(result.history, out_loss)
    save_model(
        out_model,
        trainer.denoiser,
        vocab,
        {
            "seed": seed,
            "steps": settings.steps,
            "train_labels": train_labels,
            "latent": bool(latent_dim),
            "latent_stats": stats_meta,
            "n_parameters": n_params,
            "anchor": mean_settings.anchor,
            "interaction": mean_settings.interaction if mean_model is not None else "off",
        },
        mean_model=mean_model,
    )
    trainer.remove_checkpoint()
    return result


def _scgpt_targets(
    data: ExpressionData,
    train_labels: Sequence[str],
    scgpt_dir: str | Path | None,
    gene_vocab_tsv: str | Path | None,
    latent_stats: str | Path | None,
    latent_section: Mapping[str, Any],
    processed_h5ad: str | Path,
    resume_dir: str | Path,
    seed: int,
    device: torch.device,
    draws: int,
    dist: DistContext | None = None,
) -> tuple[LatentTargets, int, dict[str, Any]]:
    """Frozen scGPT extractor + feature source + fold statistics -> the latent-target callable."""
    from ccfm.scgpt.calibration import LatentStats, genes_hash
    from ccfm.scgpt.extractor import ScGPTFeatureExtractor
    from ccfm.scgpt.feature_cache import make_latent_source
    from ccfm.scgpt.vocab import check_gene_order, read_gene_vocab, vocab_id_array

    if scgpt_dir is None or gene_vocab_tsv is None or latent_stats is None:
        raise ValueError(
            "the latent stream needs scgpt_dir, gene_vocab_tsv and latent_stats (or set latent.enabled: false)"
        )
    mapping = read_gene_vocab(gene_vocab_tsv)
    check_gene_order(mapping, data.genes, str(gene_vocab_tsv))
    vocab_ids = vocab_id_array(mapping)
    extractor = ScGPTFeatureExtractor(
        scgpt_dir,
        vocab_ids,
        device,
        latent_section.get("max_tokens_per_cell"),
        seed,
        zero_tokens=bool(latent_section.get("zero_tokens", False)),
    )
    stats = LatentStats.load(latent_stats)
    if bool(stats.metadata.get("zero_tokens", False)) != extractor.zero_tokens:
        raise ValueError(
            f"{latent_stats} was calibrated with latent.zero_tokens={stats.metadata.get('zero_tokens', False)}, "
            f"training runs with {extractor.zero_tokens}; rerun calibrate_latent"
        )
    stats.check_compatible(extractor.model_id, genes_hash(data.genes, vocab_ids))
    if stats.mean.shape[0] != extractor.dim:
        raise ValueError(
            f"{latent_stats} has {stats.mean.shape[0]} dims, the scGPT model {extractor.dim}; rerun calibrate_latent"
        )
    target_rows = np.unique(np.concatenate([data.rows_of(label) for label in train_labels] or [np.zeros(0, np.int64)]))
    mode = latent_section.get("cache", "auto")
    if mode == "auto" and draws < target_rows.size:
        # A cache costs one extraction per training cell; a short run that draws fewer cells
        # than that is cheaper on the fly.
        log.info("feature cache skipped: %d cell draws < %d training cells", draws, target_rows.size)
        mode = "off"
    source = make_latent_source(
        mode,
        extractor,
        processed_h5ad,
        target_rows,
        Path(resume_dir) / "feature_cache",
        float(latent_section.get("cache_max_gb", 20)),
        dist=dist,
    )
    meta = {key: stats.metadata.get(key) for key in ("model_id", "genes_hash", "n_cells")}
    return scgpt_latent_targets(source, stats, device), extractor.dim, meta
