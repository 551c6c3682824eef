"""The one interface the adapter needs from a trained model: CCFM's and State's are its two implementations.

The adaptation path (rules ``adapt_mmd``/``predict_target``/``score_target`` and their ``*_state``
twins, which only change inputs, outputs and parameters) is one path for every model:

* :func:`ccfm.adapt.files.adapt_to_files` learns the per-gene MMD shift through the model's
  control encoder (:meth:`AdaptableModel.control_encoder`);
* :func:`ccfm.adapt.target.predict_target_to_files` predicts the target perturbations from the
  shifted and the unshifted target controls (:meth:`AdaptableModel.target_labels`,
  :meth:`AdaptableModel.predict_target`);
* :func:`ccfm.adapt.score.score_target_to_files` scores them (no model needed; rows named after
  :attr:`AdaptableModel.method`).

Implementations are found by method name in :data:`ADAPTABLE_MODELS` and imported only when
loaded (:func:`load_adaptable`), so nothing imports the optional State add-on unless State runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp
import torch

from ccfm.adapt.shift import AdaptSettings, Encoder

# method -> (module, class) of its implementation; the module is imported by load_adaptable only.
ADAPTABLE_MODELS: dict[str, tuple[str, str]] = {
    "ccfm": ("ccfm.adapt.ccfm_model", "CCFMAdaptable"),
    "state": ("ccfm.state.adapt", "StateAdaptable"),
}


@runtime_checkable
class AdaptableModel(Protocol):
    """A trained model the MMD shift adapts to a target context, and that predicts the target's perturbations."""

    method: str  # "ccfm" | "state": names the target score rows ({method}_adapted, {method}_unadapted)
    genes: list[str]  # the model's genes, in its order: target and source data must be on them
    device: torch.device  # where the shift is learned
    cells_per_perturbation: int  # cells predicted per perturbation the request gives no count for

    def check_genes(self, genes: Sequence[str], what: str) -> None:
        """Raise a clear error unless ``genes`` are the model's genes in its order (``what`` names the data)."""
        ...

    def control_encoder(self, settings: AdaptSettings) -> Encoder:
        """The differentiable encoding of expression batches (B, G) the shift is fitted through (model frozen)."""
        ...

    def encoder_provenance(self, settings: AdaptSettings) -> dict[str, Any]:
        """What the shift was fitted through (model files, encoder): the first keys of the shift's metadata."""
        ...

    def target_labels(self, observed: Sequence[str], requested: Sequence[str]) -> list[str]:
        """Target perturbations to predict: ``requested`` first (each must be predictable), then every
        observed one the model can predict (those are scored)."""
        ...

    def predict_target(
        self,
        controls: sp.csr_matrix,
        labels: Sequence[str],
        n_cells: Mapping[str, int],
        *,
        seed: int,
        shift: np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        """``{label: cells (n, G)}`` predicted from the target ``controls`` (CSR), shifted by ``shift``
        first when given; ``n_cells`` overrides :attr:`cells_per_perturbation` per label."""
        ...


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load for the adaptation path, and how.

    ``path``: CCFM's ``model.pt``, or a State run directory. ``generate``: the config section
    ``generate`` (CCFM's sampler; State reads its ``cells_per_perturbation``); empty: its defaults.
    ``device``: None is each model's own default (CCFM: :func:`ccfm.distributed.pick_device`,
    State: the CPU).
    """

    method: str
    path: str | Path
    generate: Mapping[str, Any] = field(default_factory=dict)
    device: str | torch.device | None = None


def load_adaptable(spec: ModelSpec) -> AdaptableModel:
    """Load the implementation of ``spec.method`` (imported here, not before) on ``spec``."""
    if spec.method not in ADAPTABLE_MODELS:
        raise ValueError(f"no adaptable model is named {spec.method!r}; known: {sorted(ADAPTABLE_MODELS)}")
    module_name, class_name = ADAPTABLE_MODELS[spec.method]
    implementation = getattr(importlib.import_module(module_name), class_name)
    return implementation.load(spec)
