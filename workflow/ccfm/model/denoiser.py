"""The flow-matching logic of CCFM: time sampling, paths, losses and two-stage generation.

One training sample is either a *latent* sample or an *expression* sample
(``dino_first_cascaded`` in Latent Forcing's terms):

- latent branch (probability ``choose_latent_p``): ``t_latent ~ p(t)``, ``t_expr = 0`` (the
  expression stream is pure noise), only the latent velocity is trained;
- expression branch: ``t_expr ~ p(t)``, ``t_latent = 1`` (clean latent, or ``U(lo, 1)`` in the
  ``_noised`` variant so stage 2 tolerates imperfect stage-1 latents), only the expression
  velocity is trained.

Both streams follow the affine conditional-OT path ``x_t = t·x1 + (1−t)·x0`` with Gaussian
``x0`` and target velocity ``x1 − x0``. Optionally an unbiased multi-bandwidth RBF MMD between
the one-step estimate ``x̂1 = x_t + v·(1−t)`` and the target cells is added with weight ``gamma``.

Generation integrates the latent ODE from noise with ``t_expr = 0`` (stage 1), then the
expression ODE with the generated latent held clean (``t_latent = 1``, stage 2), and clamps
expression at 0. Without a latent stream it is the plain scDFM sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchdiffeq import odeint

from ccfm.config import section_defaults, settings_from
from ccfm.model.mmd import multiscale_rbf_mmd
from ccfm.model.model import CascadedFlowModel

ODE_METHODS = ("rk4", "euler", "midpoint", "dopri5")
TIME_SCHEDULES = ("uniform", "logit_normal")
# Where the expression flow starts: Gaussian noise (the plan) or the control cell moved by the
# mean model's predicted shift (``model.anchor: additive``; see ccfm.model.mean_model).
SOURCES = ("gaussian", "control")
# What the network is shown as its control cell in a control-anchored flow (see FlowSettings).
CONDITION_CELLS = ("separate", "start")
COUPLINGS = ("independent", "ot")


_TRAIN = section_defaults("train")
_GENERATE = section_defaults("generate")


@dataclass(frozen=True)
class Integration:
    """How the sampler integrates: steps of each stage's ODE and the solver (config ``generate.*``)."""

    latent_steps: int = _GENERATE["latent_steps"]
    expr_steps: int = _GENERATE["expr_steps"]
    method: str = _GENERATE["method"]


@dataclass(frozen=True)
class FlowStart:
    """Where the flows start. ``z_noise`` / ``x_noise``: the latent and (Gaussian-source) expression
    starting noise, drawn from ``generator`` when not given; ``x_start``: where a control-anchored
    expression flow starts (default: the control cells themselves)."""

    generator: torch.Generator | None = None
    x_start: Tensor | None = None
    z_noise: Tensor | None = None
    x_noise: Tensor | None = None


@dataclass
class FlowSettings:
    """Training/sampling knobs of the denoiser (config ``train``/``generate`` keys)."""

    choose_latent_p: float = _TRAIN["choose_latent_p"]
    latent_weight: float = _TRAIN["latent_weight"]
    mmd: bool = _TRAIN["mmd"]
    gamma: float = _TRAIN["gamma"]
    # "uniform" (the plan) or "logit_normal" (Latent Forcing: latent N(-1.2, 1), expr N(-0.4, 0.8)).
    time_schedule: str = _TRAIN["time_schedule"]
    latent_t_mean: float = _TRAIN["latent_t_mean"]
    latent_t_std: float = _TRAIN["latent_t_std"]
    expr_t_mean: float = _TRAIN["expr_t_mean"]
    expr_t_std: float = _TRAIN["expr_t_std"]
    # Latent Forcing's `_noised` variant: in the expression branch t_latent ~ U(noised_low, 1).
    stage2_noised: bool = _TRAIN["stage2_noised"]
    noised_low: float = _TRAIN["noised_low"]
    # "velocity": the network output is the velocity; "x": it is x̂1, converted to velocity.
    prediction: str = _TRAIN["prediction"]
    x_pred_min_denominator: float = _TRAIN["x_pred_min_denominator"]
    source: str = "gaussian"
    # Control-anchored flow only. "separate": the network's control-cell input is drawn apart
    # from the cell the flow starts at, so (x_t, t, label) is all it knows of where the path
    # began and the learned flow carries the distribution of starting cells onto that of the
    # target cells. "start": that same cell, the old coupling: given it, x0 is known and the
    # loss's exact minimiser sends every cell to the condition mean (zero spread).
    condition_cell: str = _TRAIN["condition_cell"]
    # Pairing of starting and target cells in a batch: "independent" or minibatch OT.
    coupling: str = _TRAIN["coupling"]

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"flow source {self.source!r} is unknown: use one of {SOURCES}")
        if self.condition_cell not in CONDITION_CELLS:
            raise ValueError(f"train.condition_cell {self.condition_cell!r} is unknown: use one of {CONDITION_CELLS}")
        if self.coupling not in COUPLINGS:
            raise ValueError(f"train.coupling {self.coupling!r} is unknown: use one of {COUPLINGS}")
        if self.time_schedule not in TIME_SCHEDULES:
            raise ValueError(f"train.time_schedule {self.time_schedule!r} is unknown: use one of {TIME_SCHEDULES}")
        if self.prediction not in ("velocity", "x"):
            raise ValueError(f"train.prediction {self.prediction!r} is unknown: use 'velocity' or 'x'")
        if not 0.0 <= self.choose_latent_p <= 1.0:
            raise ValueError(f"train.choose_latent_p must lie in [0, 1], got {self.choose_latent_p}")

    @classmethod
    def from_train_section(cls, train: Mapping[str, Any]) -> FlowSettings:
        """The denoiser's keys of a ``train`` config section (:func:`ccfm.config.settings_from`)."""
        return settings_from(cls, "train", train)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TimeSample:
    """Per-sample times and loss weights from :meth:`CascadedDenoiser.sample_t`."""

    t_expr: Tensor
    t_latent: Tensor
    w_expr: Tensor
    w_latent: Tensor


def weighted_mean(per_sample: Tensor, weights: Tensor, total_weight: Tensor | None = None) -> Tensor:
    """Mean of ``per_sample`` over the samples that train this stream (weight > 0).

    ``total_weight`` is the weight of the whole global batch when ``per_sample`` holds one
    process's shard: the result is then that shard's share of the global mean.
    """
    total = weights.sum() if total_weight is None else total_weight
    return (per_sample * weights).sum() / total.clamp(min=1.0)


@dataclass(frozen=True)
class BatchShard:
    """Rows ``[start, stop)`` of a global batch of ``total`` samples split over ``world_size`` processes.

    ``gather`` concatenates every process's rows in rank order, passing gradients back to each
    process's own rows (:func:`ccfm.distributed.gather_rows`).
    """

    start: int
    stop: int
    total: int
    world_size: int
    gather: Callable[[Tensor], Tensor]

    @classmethod
    def whole(cls, size: int) -> BatchShard:
        return cls(0, size, size, 1, lambda rows: rows)


class CascadedDenoiser(nn.Module):
    """Wraps :class:`CascadedFlowModel` with the flow-matching training loss and the sampler."""

    def __init__(self, model: CascadedFlowModel, settings: FlowSettings) -> None:
        super().__init__()
        self.model = model
        self.settings = settings

    @property
    def latent_enabled(self) -> bool:
        return self.model.config.latent_enabled

    # -- time sampling -----------------------------------------------------------------------

    def _draw_t(
        self, n: int, mean: float, std: float, generator: torch.Generator | None, device: torch.device
    ) -> Tensor:
        if self.settings.time_schedule == "uniform":
            return torch.rand(n, generator=generator, device=device)
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))

    def sample_t(
        self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> TimeSample:
        """``dino_first_cascaded`` times and per-sample loss weights for a batch of ``n``."""
        s = self.settings
        device = torch.device(device)
        t_expr = self._draw_t(n, s.expr_t_mean, s.expr_t_std, generator, device)
        t_latent = self._draw_t(n, s.latent_t_mean, s.latent_t_std, generator, device)
        choose_latent = torch.rand(n, generator=generator, device=device) < s.choose_latent_p
        if not self.latent_enabled:
            ones = torch.ones(n, device=device)
            return TimeSample(t_expr, ones, ones, torch.zeros(n, device=device))
        clean = torch.ones(n, device=device)
        if s.stage2_noised:
            clean = s.noised_low + (1 - s.noised_low) * torch.rand(n, generator=generator, device=device)
        return TimeSample(
            t_expr=torch.where(choose_latent, torch.zeros_like(t_expr), t_expr),
            t_latent=torch.where(choose_latent, t_latent, clean),
            w_expr=(~choose_latent).float(),
            w_latent=choose_latent.float(),
        )

    # -- paths and velocities ----------------------------------------------------------------

    @staticmethod
    def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        """Affine CondOT path ``t·x1 + (1−t)·x0``, ``t`` (B,) broadcast over the trailing dims."""
        t = t.view(-1, *([1] * (x1.dim() - 1)))
        return t * x1 + (1 - t) * x0

    def _to_velocity(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        if self.settings.prediction == "velocity":
            return output
        # x-prediction (Latent Forcing): the network gives x̂1; v = (x̂1 − x_t) / (1 − t).
        t = t.view(-1, *([1] * (x_t.dim() - 1)))
        return (output - x_t) / (1 - t).clamp(min=self.settings.x_pred_min_denominator)

    def velocities(
        self,
        gene_ids: Tensor,
        source: Tensor,
        x_t: Tensor,
        z_t: Tensor | None,
        t_expr: Tensor,
        t_latent: Tensor,
        pert_ids: Tensor,
    ) -> tuple[Tensor, Tensor | None]:
        """Model forward, converted to velocities for both streams."""
        out_expr, out_latent = self.model(
            gene_ids, source, x_t, z_t, t_expr, t_latent if self.latent_enabled else None, pert_ids
        )
        v_expr = self._to_velocity(out_expr, x_t, t_expr)
        v_latent = None if out_latent is None or z_t is None else self._to_velocity(out_latent, z_t, t_latent)
        return v_expr, v_latent

    # -- training loss -----------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """:meth:`loss` (so DistributedDataParallel can wrap the denoiser and sync its gradients)."""
        return self.loss(*args, **kwargs)

    def loss(
        self,
        gene_ids: Tensor,
        source: Tensor,
        target: Tensor,
        pert_ids: Tensor,
        z_target: Tensor | None = None,
        generator: torch.Generator | None = None,
        shard: BatchShard | None = None,
        x_start: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Flow-matching loss for one batch (or one process's shard of it).

        Args:
            gene_ids: (B, G) gene indices of the window.
            source: (B, G) control cells (unpaired with the targets).
            target: (B, G) perturbed cells (log1p).
            pert_ids: (B, 2) perturbation ids.
            z_target: (B, G, D) normalised scGPT features of the target cells (latent models).
            generator: RNG for times and noise (seeded by the caller).
            shard: which rows of the global batch these B samples are. Times and noise are drawn
                for the whole global batch (every process draws the same) and sliced, so the
                samples get the same randomness whatever the number of processes.
            x_start: (B, G) starting points of the expression flow when ``settings.source`` is
                ``control`` (the anchored control cells); ignored for a Gaussian source.

        Returns:
            ``total`` (with grad) and detached ``expr``, ``latent``, ``mmd`` parts, each this
            shard's share: summed over processes they give the global batch's values.
        """
        batch, device = target.shape[0], target.device
        shard = shard or BatchShard.whole(batch)
        if shard.stop - shard.start != batch:
            raise ValueError(f"shard [{shard.start}, {shard.stop}) does not match a batch of {batch} samples")
        rows = slice(shard.start, shard.stop)
        every = self.sample_t(shard.total, device, generator)
        times = TimeSample(every.t_expr[rows], every.t_latent[rows], every.w_expr[rows], every.w_latent[rows])
        x0 = torch.randn((shard.total, *target.shape[1:]), generator=generator, device=device, dtype=target.dtype)[rows]
        if self.settings.source == "control":
            if x_start is None:
                raise ValueError("a control-anchored flow needs x_start, the anchored control cells")
            x0 = x_start.to(target.dtype)
        x_t = self.interpolate(x0, target, times.t_expr)
        z_t = None
        if self.latent_enabled:
            if z_target is None:
                raise ValueError(
                    "the latent stream is enabled: pass z_target, the target cells' normalised scGPT features"
                )
            z0 = torch.randn(
                (shard.total, *z_target.shape[1:]), generator=generator, device=device, dtype=z_target.dtype
            )[rows]
            z_t = self.interpolate(z0, z_target, times.t_latent)

        v_expr, v_latent = self.velocities(gene_ids, source, x_t, z_t, times.t_expr, times.t_latent, pert_ids)
        expr_loss = weighted_mean((v_expr.float() - (target - x0)).pow(2).mean(dim=1), times.w_expr, every.w_expr.sum())
        latent_loss = torch.zeros((), device=device)
        if v_latent is not None and z_target is not None:
            latent_loss = weighted_mean(
                (v_latent.float() - (z_target - z0)).pow(2).mean(dim=(1, 2)), times.w_latent, every.w_latent.sum()
            )
        total = expr_loss + self.settings.latent_weight * latent_loss

        mmd = torch.zeros((), device=device)
        if self.settings.mmd and self.settings.gamma > 0:
            # Only expression-branch samples have a meaningful x̂1 (in the latent branch t_expr = 0
            # and the latent condition is still noisy). The MMD compares distributions, so it is
            # taken over the whole global batch; each process keeps a 1/world share.
            trained = every.w_expr > 0
            x1_hat = shard.gather(x_t + v_expr.float() * (1 - times.t_expr)[:, None])
            predicted, observed = x1_hat[trained].float(), shard.gather(target)[trained].float()
            if predicted.shape[0] >= 2:
                mmd = multiscale_rbf_mmd(predicted, observed) / shard.world_size
            total = total + self.settings.gamma * mmd
        return {"total": total, "expr": expr_loss.detach(), "latent": latent_loss.detach(), "mmd": mmd.detach()}

    # -- generation --------------------------------------------------------------------------

    @staticmethod
    def _integrate(field: Callable[[Tensor, Tensor], Tensor], start: Tensor, steps: int, method: str) -> Tensor:
        if method not in ODE_METHODS:
            raise ValueError(f"generate.method {method!r} is unknown: use one of {ODE_METHODS}")
        if steps < 2 and method != "dopri5":
            raise ValueError(f"ODE needs at least 2 time points, got steps={steps}")
        grid = torch.linspace(0.0, 1.0, max(steps, 2), device=start.device)
        return odeint(field, start, grid, method=method)[-1]

    @torch.no_grad()
    def generate_latent(
        self,
        gene_ids: Tensor,
        source: Tensor,
        pert_ids: Tensor,
        steps: Integration = Integration(),
        start: FlowStart = FlowStart(),
    ) -> Tensor:
        """Stage 1: integrate the latent ODE from Gaussian noise with ``t_expr = 0``.

        The expression input is the expression flow's starting point, as in training: noise, or
        the (anchored) control cells for a control-anchored flow. ``start``: the starting noise,
        drawn from ``start.generator`` when not given.
        """
        batch, n_genes = source.shape
        dim = self.model.config.latent_dim
        device = source.device
        z_noise = start.z_noise
        if z_noise is None:
            z_noise = torch.randn((batch, n_genes, dim), generator=start.generator, device=device)
        x_noise = self._expression_start(source, start)
        t_expr = torch.zeros(batch, device=device)

        def latent_field(t: Tensor, z_t: Tensor) -> Tensor:
            _, v_latent = self.velocities(gene_ids, source, x_noise, z_t, t_expr, t.expand(batch), pert_ids)
            assert v_latent is not None
            return v_latent.float()

        return self._integrate(latent_field, z_noise, steps.latent_steps, steps.method)

    @torch.no_grad()
    def generate_expression(
        self,
        gene_ids: Tensor,
        source: Tensor,
        pert_ids: Tensor,
        latent: Tensor | None,
        steps: Integration = Integration(),
        start: FlowStart = FlowStart(),
    ) -> Tensor:
        """Stage 2: integrate the expression ODE with ``latent`` held clean (``t_latent = 1``).

        The ODE starts from Gaussian noise (``start.x_noise``, drawn from ``start.generator`` when
        not given), or from ``start.x_start`` (default: the control cells themselves) for a
        control-anchored flow.
        """
        batch = source.shape[0]
        x_noise = self._expression_start(source, start)
        t_latent = torch.ones(batch, device=source.device)

        def expr_field(t: Tensor, x_t: Tensor) -> Tensor:
            v_expr, _ = self.velocities(gene_ids, source, x_t, latent, t.expand(batch), t_latent, pert_ids)
            return v_expr.float()

        return self._integrate(expr_field, x_noise, steps.expr_steps, steps.method)

    def _expression_start(self, source: Tensor, start: FlowStart) -> Tensor:
        """Where the expression flow starts: the (anchored) control cells, or Gaussian noise."""
        if self.settings.source == "control":
            return source.float() if start.x_start is None else start.x_start.float()
        if start.x_noise is not None:
            return start.x_noise
        return torch.randn(source.shape, generator=start.generator, device=source.device)

    @torch.no_grad()
    def generate(
        self,
        gene_ids: Tensor,
        source: Tensor,
        pert_ids: Tensor,
        steps: Integration = Integration(),
        start: FlowStart = FlowStart(),
        latent: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Two-stage cascaded generation -> (expression ≥ 0 (B, G), latent (B, G, D) or None).

        ``latent`` may be given to skip stage 1 (used to test that stage 2 reads it); ``start``
        holds where the flows start (see :class:`FlowStart`), shared by both stages.
        """
        if self.latent_enabled and latent is None:
            latent = self.generate_latent(gene_ids, source, pert_ids, steps, start)
        if not self.latent_enabled:
            latent = None
        expression = self.generate_expression(gene_ids, source, pert_ids, latent, steps, start)
        return expression.clamp(min=0.0), latent
