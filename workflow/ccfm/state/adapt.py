"""A State run directory as an :class:`ccfm.adapt.adaptable.AdaptableModel` (the original plan's setting, done right).

The adaptation path is CCFM's (:mod:`ccfm.adapt`): one additive offset per gene on the target's
log1p expression, ``max(X_tgt + s, 0)``, fitted so that State's ``basal_encoder`` of the shifted
target controls is MMD-close to its encoding of the source controls. The shift acts on raw
expression and the encoder is applied after it, once (the seed script encoded the target
controls and then encoded the encodings again). Target perturbations are predicted with the
model's ``predict_step`` from the shifted and, for comparison, the unshifted target controls
(:func:`ccfm.state.predict.predict_from_controls`), and scored as CCFM's are, in rows named
``state_*``.

The run directory is either the pipeline's own fold model or any State run directory a user
holds (config ``state.run_dir``), loaded with :func:`ccfm.state.model.load_state_run`. This
module is imported only by :func:`ccfm.adapt.adaptable.load_adaptable` when State runs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from ccfm import CONTROL_LABEL
from ccfm.adapt.adaptable import ModelSpec
from ccfm.adapt.requests import counts_by_label
from ccfm.adapt.shift import AdaptSettings, Encoder
from ccfm.config import section_defaults
from ccfm.state.model import StateRun, check_genes, encode_basal, load_state_run
from ccfm.state.predict import predict_from_controls

log = logging.getLogger(__name__)


def state_target_labels(run: StateRun, observed: Sequence[str], requested: Sequence[str]) -> list[str]:
    """Target perturbations to predict: ``requested`` first (each must be known to State, alone or as
    a combination of known singles), then every observed one State can represent (what is scored)."""

    def representable(label: str) -> bool:
        return label in run.pert_map or all(part in run.pert_map for part in label.split("+"))

    labels = list(dict.fromkeys(str(r) for r in requested))
    unknown = [label for label in labels if label == CONTROL_LABEL or not representable(label)]
    if unknown:
        raise ValueError(f"target.predict lists {unknown}, which the State model in {run.directory} has no one-hot for")
    candidates = sorted(set(map(str, observed)) - {CONTROL_LABEL} - set(labels))
    extra = [label for label in candidates if representable(label)]
    skipped = sorted(set(candidates) - set(extra))
    if skipped:
        log.warning(
            "%d target perturbation(s) unknown to the State model are not predicted: %s", len(skipped), skipped[:20]
        )
    labels += extra
    if not labels:
        raise ValueError(f"no target perturbation is known to the State model in {run.directory}; nothing to predict")
    return labels


@dataclass
class StateAdaptable:
    """A State run directory behind :class:`ccfm.adapt.adaptable.AdaptableModel` (on the CPU unless told)."""

    run: StateRun
    cells_per_perturbation: int
    method: str = "state"

    @classmethod
    def load(cls, spec: ModelSpec) -> StateAdaptable:
        cells = spec.generate.get("cells_per_perturbation", section_defaults("generate")["cells_per_perturbation"])
        device = spec.device if spec.device is not None else "cpu"
        return cls(load_state_run(spec.path, device=device), int(cells))

    @property
    def genes(self) -> list[str]:
        return list(self.run.genes)

    @property
    def device(self) -> torch.device:
        return self.run.device

    def check_genes(self, genes: Sequence[str], what: str) -> None:
        check_genes(self.run, genes, what)

    def control_encoder(self, settings: AdaptSettings) -> Encoder:
        """State's basal encoder (``settings.encoding`` is CCFM's choice and does not apply)."""
        return lambda expression: encode_basal(self.run, expression)

    def encoder_provenance(self, settings: AdaptSettings) -> dict[str, Any]:
        run = self.run
        return {"encoder": "state basal_encoder", "model": str(run.directory), "checkpoint": str(run.checkpoint)}

    def target_labels(self, observed: Sequence[str], requested: Sequence[str]) -> list[str]:
        return state_target_labels(self.run, observed, requested)

    def predict_target(
        self,
        controls: sp.csr_matrix,
        labels: Sequence[str],
        n_cells: Mapping[str, int],
        *,
        seed: int,
        shift: np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        counts = counts_by_label(labels, n_cells, self.cells_per_perturbation)
        return predict_from_controls(self.run, controls, labels, counts, seed, shift=shift)
