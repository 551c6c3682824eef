"""The mean of a perturbation's cells: additive anchor plus a learned interaction residual.

Flow matching with unpaired controls regresses on targets whose per-gene spread is several times
the perturbation effect, so at any practical budget it learns condition *means* poorly. CCFM
therefore decomposes the prediction (config ``model.anchor: additive``)::

    pseudobulk mean(A+B) = control mean + δ(A) + δ(B) + r(A, B)

with δ the observed single-perturbation effects of the training cells and ``r`` a small network
fitted on the pseudobulk residuals of the training doubles. The flow then only has to model the
distribution of cells around that mean: it starts from each control cell moved by the predicted
shift, and the generated cells are re-centred on the predicted mean (:func:`match_mean`).

``r`` is order-invariant and can express interactions (it is not a mean of two embeddings): each
partner is described by its observed single response (projected on the singles' principal
directions), the pair by the symmetric sum and product of the two encodings plus two scalars
(cosine similarity of the single responses, co-expression of the two genes in control cells).
Its output is a gene-specific low-rank term (joint programmes neither partner shows alone) plus
a per-gene term of the two single effects at that gene (saturation of a shared programme). The
output layers start at zero, so an unfitted ``r`` is exactly additive; it is fitted with weight
decay and early stopping on held-back training doubles, then refitted on all of them for the
chosen number of epochs. With too few training doubles ``r`` stays zero (and says so).

Singles seen in training are anchored on their own observed mean. An unseen single (no training
cells) is anchored on the mean training single effect (``model.unseen: meanpert``, the default)
or has no anchor and falls back to the flow's gene-embedding path (``unseen: embedding``); a
double with an unseen partner is the sum of its partners' anchors, without ``r``, which needs
both partners' observed responses.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ccfm import COMBO_SEPARATOR
from ccfm.config import check_section_keys, section_defaults, settings_from

log = logging.getLogger(__name__)

ANCHORS = ("additive", "none")
# What an unseen single (no training cells) is anchored on: the mean training single effect, or
# nothing (the flow's gene-embedding path alone).
UNSEEN = ("meanpert", "embedding")
# How r(A, B) is learned: a network, a similarity kernel over training doubles, or not at all.
INTERACTIONS = ("network", "kernel", "off")
KERNEL_POWERS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
KERNEL_SHRINKAGE = (0.03, 0.1, 0.3, 1.0, 3.0)


_MODEL = section_defaults("model")
_TRAIN = section_defaults("train")


@dataclass
class MeanModelSettings:
    """Knobs of the mean decomposition (config ``model.anchor``, ``model.interaction*``, ``train.interaction_*``)."""

    anchor: str = _MODEL["anchor"]  # "additive": mean model + control-anchored flow; "none": the plain flow
    interaction: str = _MODEL["interaction"]  # see INTERACTIONS; "off" keeps the anchor purely additive
    # Shrink each single's per-gene effect towards 0 by its sampling noise (positive-part
    # James-Stein per gene): most genes do not respond, and their noise adds up in a double.
    shrink_singles: bool = _MODEL["shrink_singles"]
    # Unseen singles: "meanpert" anchors them on the mean effect of the training singles;
    # "embedding" leaves them to the flow's perturbation embedding.
    unseen: str = _MODEL["unseen"]
    interaction_hidden: int = _MODEL["interaction_hidden"]
    interaction_rank: int = _MODEL["interaction_rank"]  # principal directions of the singles describing each partner
    interaction_lr: float = _TRAIN["interaction_lr"]
    interaction_weight_decay: float = _TRAIN["interaction_weight_decay"]
    interaction_epochs: int = _TRAIN["interaction_epochs"]
    interaction_patience: int = _TRAIN["interaction_patience"]
    interaction_holdout: float = _TRAIN["interaction_holdout"]
    interaction_min_doubles: int = _TRAIN["interaction_min_doubles"]

    def __post_init__(self) -> None:
        if self.anchor not in ANCHORS:
            raise ValueError(f"model.anchor {self.anchor!r} is unknown: use one of {ANCHORS}")
        if self.interaction is True or self.interaction is False:  # YAML booleans: on = the default learner
            self.interaction = "kernel" if self.interaction else "off"
        if self.unseen not in UNSEEN:
            raise ValueError(f"model.unseen {self.unseen!r} is unknown: use one of {UNSEEN}")
        if self.interaction not in INTERACTIONS:
            raise ValueError(f"model.interaction {self.interaction!r} is unknown: use one of {INTERACTIONS}")
        if not 0 < self.interaction_holdout < 1:
            raise ValueError(f"train.interaction_holdout must lie in (0, 1), got {self.interaction_holdout}")

    @classmethod
    def from_sections(cls, model: Mapping[str, Any], train: Mapping[str, Any]) -> MeanModelSettings:
        check_section_keys("train", train)
        return settings_from(cls, "model", model, **{k: v for k, v in train.items() if k.startswith("interaction_")})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def double_parts(label: str, separator: str = COMBO_SEPARATOR) -> tuple[str, str] | None:
    parts = [p for p in label.split(separator) if p]
    return (parts[0], parts[1]) if len(parts) == 2 else None


class InteractionResidual(nn.Module):
    """r(A, B) from the two partners' features; zero output at initialisation."""

    def __init__(self, n_genes: int, feature_dim: int, hidden: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        # [h_A + h_B, h_A * h_B, cosine, co-expression] -> pair code.
        self.pair = nn.Sequential(nn.Linear(2 * hidden + 2, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.programme = nn.Linear(hidden, n_genes)  # gene-specific joint programmes
        self.local = nn.Sequential(nn.Linear(3 + 8, 32), nn.GELU(), nn.Linear(32, 1))  # per-gene term
        self.local_code = nn.Linear(hidden, 8)
        for head in (self.programme, self.local[-1]):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, f_a: Tensor, f_b: Tensor, d_a: Tensor, d_b: Tensor, scalars: Tensor) -> Tensor:
        """Features (P, k), single deltas (P, G), pair scalars (P, 2) -> residual (P, G)."""
        h_a, h_b = self.encoder(f_a), self.encoder(f_b)
        code = self.pair(torch.cat([h_a + h_b, h_a * h_b, scalars], dim=-1))
        per_gene = torch.stack([d_a + d_b, d_a * d_b, (d_a - d_b).abs()], dim=-1)  # symmetric in A, B
        local_code = self.local_code(code)[:, None, :].expand(-1, per_gene.shape[1], -1)
        local = self.local(torch.cat([per_gene, local_code], dim=-1)).squeeze(-1)
        return self.programme(code) + local


class MeanModel(nn.Module):
    """Predicted pseudobulk shift of a perturbation relative to the control mean (log1p scale)."""

    def __init__(
        self,
        genes: Sequence[str],
        control_mean: np.ndarray,
        singles: Sequence[str],
        single_deltas: np.ndarray,
        coexpression: Mapping[str, np.ndarray] | None,
        settings: MeanModelSettings,
        separator: str = COMBO_SEPARATOR,
    ) -> None:
        super().__init__()
        self.genes = list(genes)
        self.singles = list(singles)
        self.settings = settings
        self.separator = separator
        self._single_index = {name: i for i, name in enumerate(self.singles)}
        deltas = torch.as_tensor(np.asarray(single_deltas, dtype=np.float32)).reshape(
            len(self.singles), len(self.genes)
        )
        self.register_buffer("control_mean", torch.as_tensor(np.asarray(control_mean, dtype=np.float32)))
        self.register_buffer("single_deltas", deltas)
        basis, scale = _principal_directions(deltas, settings.interaction_rank)
        self.register_buffer("basis", basis)  # (G, k)
        self.register_buffer("feature_scale", scale)
        # Correlation of each single's gene with the others in control cells (0 where unmeasured).
        coexp = torch.zeros(len(self.singles), len(self.singles))
        if coexpression:
            for name, row in coexpression.items():
                if name in self._single_index:
                    coexp[self._single_index[name]] = torch.as_tensor(np.asarray(row, dtype=np.float32))
        self.register_buffer("coexpression", coexp)
        self.residual = self.new_residual()
        self.fitted_epochs = 0
        # Kernel learner: the training doubles (single indices), their residuals and (power, shrinkage).
        self.register_buffer("kernel_pairs", torch.zeros((0, 2), dtype=torch.long))
        self.register_buffer("kernel_residuals", torch.zeros((0, len(self.genes))))
        self.register_buffer("kernel_params", torch.zeros(2))

    def new_residual(self) -> InteractionResidual:
        """A fresh ``r`` for these genes and principal directions (zero output: exactly additive)."""
        return InteractionResidual(len(self.genes), self.basis.shape[1], self.settings.interaction_hidden)

    # -- lookups -----------------------------------------------------------------------------

    def has_single(self, name: str) -> bool:
        return name in self._single_index

    def anchored(self, label: str) -> bool:
        """Whether ``label``'s mean is predicted here (else the flow's embedding path predicts it)."""
        if self.settings.unseen == "meanpert" and self.singles:
            return True
        parts = double_parts(label, self.separator)
        if parts is None:
            return self.has_single(label)
        return all(self.has_single(p) for p in parts)

    def _single_effect(self, name: str) -> Tensor:
        """A single's shrunk effect; for an unseen one (``unseen: meanpert``) the mean training effect."""
        if self.has_single(name):
            return self.single_deltas[self._single_index[name]]
        return self.single_deltas.mean(dim=0)

    def _pair_inputs(self, pairs: Sequence[tuple[str, str]]) -> tuple[Tensor, ...]:
        ia = torch.tensor([self._single_index[a] for a, _ in pairs])
        ib = torch.tensor([self._single_index[b] for _, b in pairs])
        d_a, d_b = self.single_deltas[ia], self.single_deltas[ib]
        f_a, f_b = d_a @ self.basis / self.feature_scale, d_b @ self.basis / self.feature_scale
        cosine = nn.functional.cosine_similarity(d_a, d_b, dim=-1, eps=1e-8)
        scalars = torch.stack([cosine, self.coexpression[ia, ib]], dim=-1)
        return f_a, f_b, d_a, d_b, scalars

    def residuals(self, pairs: Sequence[tuple[str, str]]) -> Tensor:
        """r(A, B) for each pair (P, G); zero when the learner is off or was never fitted."""
        if not pairs or self.settings.interaction == "off":
            return self.single_deltas.new_zeros((len(pairs), len(self.genes)))
        if self.settings.interaction == "kernel":
            return self._kernel_residuals(pairs)
        return self.residual(*self._pair_inputs(pairs))

    def pair_similarity(self, pairs: Sequence[tuple[str, str]], others: Tensor) -> Tensor:
        """Similarity (P, Q) of pairs to index pairs ``others`` (Q, 2): the better matching of the
        partners by the cosine of their single responses (in the top ``interaction_rank``
        principal directions of the singles), each factor clamped at 0."""
        # Cosine in the singles' principal subspace: the per-gene noise outside it is dropped.
        deltas = nn.functional.normalize(self.single_deltas @ self.basis, dim=-1, eps=1e-8)
        cos = (deltas @ deltas.T).clamp(min=0.0)
        ia = torch.tensor([self._single_index[a] for a, _ in pairs])
        ib = torch.tensor([self._single_index[b] for _, b in pairs])
        c, d = others[:, 0], others[:, 1]
        straight = cos[ia][:, c] * cos[ib][:, d]
        crossed = cos[ia][:, d] * cos[ib][:, c]
        return torch.maximum(straight, crossed)

    def _kernel_residuals(self, pairs: Sequence[tuple[str, str]]) -> Tensor:
        if self.kernel_pairs.shape[0] == 0:
            return self.single_deltas.new_zeros((len(pairs), len(self.genes)))
        power, shrinkage = float(self.kernel_params[0]), float(self.kernel_params[1])
        weights = self.pair_similarity(pairs, self.kernel_pairs).pow(power)
        return weights @ self.kernel_residuals / (shrinkage + weights.sum(dim=1, keepdim=True))

    @torch.no_grad()
    def delta(self, label: str) -> Tensor | None:
        """Predicted mean shift (G,) of ``label`` vs the control mean; None when not anchored."""
        if not self.anchored(label):
            return None
        parts = double_parts(label, self.separator)
        if parts is None:
            return self._single_effect(label).clone()
        a, b = parts
        additive = self._single_effect(a) + self._single_effect(b)
        if not (self.has_single(a) and self.has_single(b)):
            return additive  # r needs both partners' observed responses
        return additive + self.residuals([parts])[0]

    @torch.no_grad()
    def mean(self, label: str) -> Tensor | None:
        shift = self.delta(label)
        return None if shift is None else self.control_mean + shift

    # -- saving --------------------------------------------------------------------------------

    def to_payload(self) -> dict[str, Any]:
        return {
            "meta": json.dumps(
                {
                    "genes": self.genes,
                    "singles": self.singles,
                    "settings": self.settings.to_dict(),
                    "separator": self.separator,
                    "fitted_epochs": self.fitted_epochs,
                }
            ),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> MeanModel:
        meta = json.loads(payload["meta"])
        state = payload["state_dict"]
        model = cls(
            meta["genes"],
            state["control_mean"].numpy(),
            meta["singles"],
            state["single_deltas"].numpy(),
            None,
            MeanModelSettings(**meta["settings"]),
            meta["separator"],
        )
        # The kernel's buffers are sized by the training doubles: take their shapes from the file.
        for name in ("kernel_pairs", "kernel_residuals", "kernel_params"):
            setattr(model, name, torch.zeros_like(state[name]))
        model.load_state_dict(state)
        model.fitted_epochs = int(meta["fitted_epochs"])
        return model.eval()


def _principal_directions(deltas: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Top right-singular vectors (G, k) of the singles' deltas and a scale making features O(1)."""
    if deltas.shape[0] == 0:
        return torch.zeros(deltas.shape[1], 1), torch.ones(())
    _, singular, vh = torch.linalg.svd(deltas.double(), full_matrices=False)
    k = max(1, min(rank, vh.shape[0]))
    scale = (singular[0] / np.sqrt(max(deltas.shape[0], 1))).clamp(min=1e-6)
    return vh[:k].T.float().contiguous(), scale.float()


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


@dataclass
class FitReport:
    n_doubles: int
    n_holdout: int
    best_epoch: int
    holdout_mse_additive: float
    holdout_mse_fitted: float


def fit_interaction(model: MeanModel, double_means: Mapping[str, np.ndarray], seed: int) -> FitReport | None:
    """Fit ``r`` on training doubles' pseudobulk residuals; early-stop on held-back doubles.

    ``double_means`` maps training double labels to their observed mean profile. Returns None
    (r stays zero) when interaction learning is off or there are too few usable doubles.
    """
    s = model.settings
    pairs, targets = [], []
    for label, mean in sorted(double_means.items()):
        parts = double_parts(label, model.separator)
        if parts is None or not (model.has_single(parts[0]) and model.has_single(parts[1])):
            continue
        additive = model.control_mean + model._single_effect(parts[0]) + model._single_effect(parts[1])
        pairs.append(parts)
        targets.append(torch.as_tensor(np.asarray(mean, dtype=np.float32)) - additive)
    if s.interaction == "off":
        return None
    if len(pairs) < s.interaction_min_doubles:
        log.info(
            "interaction residual off: %d training doubles with both singles observed (< %d)",
            len(pairs),
            s.interaction_min_doubles,
        )
        return None
    target = torch.stack(targets)
    if s.interaction == "kernel":
        return _fit_kernel(model, pairs, target)
    if len(pairs) < 2:
        log.info("interaction residual off: the network needs 2 training doubles (one held back), got %d", len(pairs))
        return None
    # The network's starting weights come from the run's seed, not from whatever the global RNG
    # held when the mean model was built.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model.residual = model.new_residual()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pairs))
    n_hold = min(len(pairs) - 1, max(1, int(round(s.interaction_holdout * len(pairs)))))
    hold, fit = np.sort(order[:n_hold]), np.sort(order[n_hold:])
    initial = copy.deepcopy(model.residual.state_dict())

    torch.manual_seed(seed)
    best_epoch, best_loss = _train_residual(
        model, pairs, target, fit, hold, s.interaction_epochs, s.interaction_patience
    )
    additive_loss = float(target[hold].pow(2).mean())
    # Refit on every training double for the chosen number of epochs (doubles are scarce).
    model.residual.load_state_dict(initial)
    torch.manual_seed(seed)
    if best_epoch > 0:
        _train_residual(model, pairs, target, np.arange(len(pairs)), None, best_epoch, None)
    model.fitted_epochs = best_epoch
    model.eval()
    report = FitReport(len(pairs), n_hold, best_epoch, additive_loss, best_loss)
    log.info(
        "interaction residual: %d doubles (%d held back), best epoch %d, held-back residual MSE %.5f -> %.5f",
        report.n_doubles,
        report.n_holdout,
        best_epoch,
        additive_loss,
        best_loss,
    )
    return report


def _fit_kernel(model: MeanModel, pairs: list[tuple[str, str]], target: Tensor) -> FitReport:
    """Pick (power, shrinkage) by leave-one-out error over the training doubles; keep r = 0 unless it helps."""
    index = torch.tensor([[model._single_index[a], model._single_index[b]] for a, b in pairs], dtype=torch.long)
    similarity = model.pair_similarity(pairs, index)
    similarity.fill_diagonal_(0.0)  # leave one out: a double never predicts itself
    additive_loss = float(target.pow(2).mean())
    best = (additive_loss, 0.0, float("inf"))
    for power in KERNEL_POWERS:
        weights = similarity.pow(power)
        for shrinkage in KERNEL_SHRINKAGE:
            predicted = weights @ target / (shrinkage + weights.sum(dim=1, keepdim=True))
            loss = float((predicted - target).pow(2).mean())
            if loss < best[0] - 1e-9:
                best = (loss, power, shrinkage)
    loss, power, shrinkage = best
    if power > 0:
        model.kernel_pairs, model.kernel_residuals = index, target.clone()
        model.kernel_params = torch.tensor([power, shrinkage])
    log.info(
        "interaction kernel: %d training doubles, leave-one-out residual MSE %.5f -> %.5f (power %g, shrinkage %g)%s",
        len(pairs),
        additive_loss,
        loss,
        power,
        shrinkage,
        "" if power > 0 else "; no setting beats additive, r stays 0",
    )
    return FitReport(len(pairs), len(pairs), 0, additive_loss, loss)


def _train_residual(
    model: MeanModel,
    pairs: list[tuple[str, str]],
    target: Tensor,
    fit: np.ndarray,
    hold: np.ndarray | None,
    epochs: int,
    patience: int | None,
) -> tuple[int, float]:
    """Full-batch AdamW on the residuals of ``fit``; returns (best epoch, its held-back MSE)."""
    s = model.settings
    optimizer = torch.optim.AdamW(
        model.residual.parameters(), lr=s.interaction_lr, weight_decay=s.interaction_weight_decay
    )
    fit_pairs = [pairs[i] for i in fit]
    fit_inputs = model._pair_inputs(fit_pairs)
    hold_inputs = model._pair_inputs([pairs[i] for i in hold]) if hold is not None else None
    best_epoch, best_loss = 0, float(target[hold].pow(2).mean()) if hold is not None else float("nan")
    model.residual.train()
    for epoch in range(1, epochs + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = (model.residual(*fit_inputs) - target[fit]).pow(2).mean()
        loss.backward()
        optimizer.step()
        if hold_inputs is None:
            continue
        with torch.no_grad():
            held = float((model.residual(*hold_inputs) - target[hold]).pow(2).mean())
        if held < best_loss - 1e-7:
            best_epoch, best_loss = epoch, held
        elif patience is not None and epoch - best_epoch > patience:
            break
    return best_epoch, best_loss


def control_coexpression(
    control_cells: np.ndarray, genes: Sequence[str], singles: Sequence[str]
) -> dict[str, np.ndarray]:
    """Pearson correlation among control cells between the perturbed genes that are measured.

    ``control_cells`` is a (n, G) dense block (a sample of controls is enough). Returns, per
    measured single, its correlation with every single (0 for unmeasured ones).
    """
    index = {g: i for i, g in enumerate(genes)}
    measured = [s for s in singles if s in index]
    out = {s: np.zeros(len(singles), dtype=np.float32) for s in singles}
    if len(measured) < 2 or control_cells.shape[0] < 3:
        return out
    block = control_cells[:, [index[s] for s in measured]].astype(np.float64)
    block = block - block.mean(axis=0)
    norm = np.sqrt((block**2).sum(axis=0))
    norm[norm == 0] = 1.0
    corr = (block.T @ block) / np.outer(norm, norm)
    np.fill_diagonal(corr, 0.0)
    position = {s: i for i, s in enumerate(singles)}
    for i, name in enumerate(measured):
        for j, other in enumerate(measured):
            out[name][position[other]] = corr[i, j]
    return out


def shrink_effect(delta: np.ndarray, noise_var: np.ndarray) -> np.ndarray:
    """Positive-part James-Stein per gene: ``δ · max(0, 1 − var(δ̂)/δ²)``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(delta != 0, 1.0 - noise_var / np.square(delta), 0.0)
    return delta * np.clip(factor, 0.0, 1.0)


def build_mean_model(
    genes: Sequence[str],
    control_mean: np.ndarray,
    condition_means: Mapping[str, np.ndarray],
    control_sample: np.ndarray,
    settings: MeanModelSettings,
    seed: int,
    separator: str = COMBO_SEPARATOR,
    mean_noise_var: Mapping[str, np.ndarray] | None = None,
) -> tuple[MeanModel, FitReport | None]:
    """Mean model from training pseudobulks: singles' deltas, control co-expression, fitted r.

    ``mean_noise_var`` maps labels (and the control label ``"__control__"``) to the per-gene
    sampling variance of their mean (variance / cells); it drives ``shrink_singles``.
    """
    singles = sorted(label for label in condition_means if double_parts(label, separator) is None)
    deltas = np.stack([condition_means[s] - control_mean for s in singles]) if singles else np.zeros((0, len(genes)))
    if settings.shrink_singles and mean_noise_var is not None and singles:
        control_var = mean_noise_var.get("__control__", 0.0)
        deltas = np.stack([shrink_effect(deltas[i], mean_noise_var[s] + control_var) for i, s in enumerate(singles)])
    coexp = control_coexpression(control_sample, genes, singles)
    model = MeanModel(genes, control_mean, singles, deltas, coexp, settings, separator)
    doubles = {label: mean for label, mean in condition_means.items() if double_parts(label, separator) is not None}
    report = fit_interaction(model, doubles, seed)
    return model, report


# --------------------------------------------------------------------------------------------
# Re-centring generated cells
# --------------------------------------------------------------------------------------------


def match_mean(cells: np.ndarray, target_mean: np.ndarray, iterations: int = 40) -> np.ndarray:
    """Shift each gene of ``cells`` (n, G) so that ``mean(max(cells + s, 0)) == max(target, 0)``.

    Clamping at zero after a plain shift would raise the mean of genes with many zeros; the
    per-gene shift ``s`` is found by bisection (the clamped mean is monotone in ``s``).
    """
    cells = np.asarray(cells, dtype=np.float64)
    target = np.maximum(np.asarray(target_mean, dtype=np.float64), 0.0)
    low = target - cells.max(axis=0) - 1.0  # everything clamped to 0: mean 0 <= target
    high = target - cells.min(axis=0) + 1.0  # nothing clamped: mean >= target
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        too_high = np.maximum(cells + mid, 0.0).mean(axis=0) > target
        high = np.where(too_high, mid, high)
        low = np.where(too_high, low, mid)
    shift = 0.5 * (low + high)
    out = np.maximum(cells + shift, 0.0)
    out[:, target <= 0] = 0.0
    return out.astype(np.float32)
