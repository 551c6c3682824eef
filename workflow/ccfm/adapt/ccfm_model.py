"""CCFM as an :class:`ccfm.adapt.adaptable.AdaptableModel`: its control encoder and its cascaded sampler."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from ccfm import CONTROL_LABEL
from ccfm.adapt.adaptable import ModelSpec
from ccfm.adapt.shift import AdaptSettings, Encoder, apply_shift, model_control_encoder
from ccfm.data.conditions import parse_condition
from ccfm.data.perturbations import PerturbationVocab
from ccfm.distributed import pick_device
from ccfm.model.checkpoint import LoadedModel, load_model
from ccfm.model.expression import ExpressionData
from ccfm.model.generation import ControlCells, GenerateSettings, GenerationSetup, controls_mean, generate_labels

log = logging.getLogger(__name__)


@dataclass
class ShiftedExpression(ExpressionData):
    """Control cells whose dense batches come out shifted, ``max(X + s, 0)``.

    Handed to :func:`ccfm.model.generation.generate_labels` in place of the source data, so the
    model engineer's sampler runs unchanged on the adapted target controls.
    """

    shift: np.ndarray | None = None

    def dense_rows(self, rows: np.ndarray) -> np.ndarray:
        dense = super().dense_rows(rows)
        return dense if self.shift is None else apply_shift(dense, self.shift)


def target_labels_to_predict(
    observed: Sequence[str], requested: Sequence[str], vocab: PerturbationVocab, control_label: str = CONTROL_LABEL
) -> list[str]:
    """The target perturbations to predict: the requested ones, then every observed one.

    ``requested`` (the dataset's ``target.predict``, e.g. the challenge's perturbations) come
    first and every entry must be embeddable by the model (a clear error otherwise). Every observed
    target perturbation is predicted too (after them, sorted): those are what the target scores
    are computed on; observed ones naming a gene the model cannot embed are skipped with a warning.
    """
    labels = list(dict.fromkeys(parse_condition(str(r), control_label=control_label).canonical for r in requested))
    if CONTROL_LABEL in labels:
        raise ValueError("target.predict lists the control label; list perturbations only")
    for label in labels:
        vocab.ids(label)
    skipped = []
    for label in sorted(set(map(str, observed)) - {control_label, CONTROL_LABEL} - set(labels)):
        try:
            vocab.ids(label)
        except KeyError:
            skipped.append(label)
            continue
        labels.append(label)
    if skipped:
        log.warning(
            "%d observed target perturbation(s) name genes the model cannot embed and are not predicted: %s",
            len(skipped),
            skipped[:20],
        )
    if not labels:
        raise ValueError(
            "no target perturbation to predict: the target data has none the model can embed and the "
            "dataset's target.predict list is empty"
        )
    return labels


@dataclass
class CCFMAdaptable:
    """A trained CCFM (``model.pt``) behind :class:`ccfm.adapt.adaptable.AdaptableModel`."""

    model: LoadedModel
    model_pt: Path
    device: torch.device
    generate: GenerateSettings
    method: str = "ccfm"

    @classmethod
    def load(cls, spec: ModelSpec) -> CCFMAdaptable:
        device = torch.device(spec.device) if spec.device is not None else pick_device()
        generate = GenerateSettings.from_section(spec.generate)
        log.info("CCFM %s on %s (sampler: %s)", spec.path, device, generate)
        return cls(load_model(spec.path, device), Path(spec.path), device, generate)

    @classmethod
    def from_generation(cls, setup: GenerationSetup) -> CCFMAdaptable:
        """The model a prediction rule already loaded (:func:`ccfm.model.generation.prepare_generation`)."""
        return cls(setup.model, setup.model_pt, setup.device, setup.settings)

    @property
    def genes(self) -> list[str]:
        return list(self.model.genes)

    @property
    def cells_per_perturbation(self) -> int:
        return self.generate.cells_per_perturbation

    def check_genes(self, genes: Sequence[str], what: str) -> None:
        if list(self.model.genes) != list(genes):
            raise ValueError(
                f"{what} has {len(genes)} genes that differ from the {len(self.model.genes)} genes {self.model_pt} "
                "was trained on (or their order differs); the target must be preprocessed on the genes of "
                "processed.h5ad (rule preprocess_target) and the model retrained after re-preprocessing"
            )

    def control_encoder(self, settings: AdaptSettings) -> Encoder:
        return model_control_encoder(self.model.denoiser.model, encoding=settings.encoding)

    def encoder_provenance(self, settings: AdaptSettings) -> dict[str, Any]:
        return {"encoding": settings.encoding, "model": str(self.model_pt)}

    def target_labels(self, observed: Sequence[str], requested: Sequence[str]) -> list[str]:
        return target_labels_to_predict(observed, requested, self.model.vocab)

    def predict_target(
        self,
        controls: sp.csr_matrix,
        labels: Sequence[str],
        n_cells: Mapping[str, int],
        *,
        seed: int,
        shift: np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        """Cells for every label from the (shifted) target controls with the cascaded sampler.

        Source cells and noise are seeded per label (:func:`ccfm.model.generation.label_seed`), so
        the adapted and unadapted predictions start from the same cells and the same noise: they
        differ only by the shift.
        """
        genes, control_labels = list(self.model.genes), np.full(controls.shape[0], CONTROL_LABEL)
        data = ShiftedExpression(controls, genes, control_labels, shift=shift)
        control_rows = np.arange(controls.shape[0])
        # An anchored model centres its cells on the context's own (unshifted) control mean + its
        # predicted shift: the MMD shift only changes what the flow sees, not the context the
        # prediction is for (centring on the shifted controls would move the prediction back into
        # the source context).
        reference = controls_mean(ShiftedExpression(controls, genes, control_labels, shift=None), control_rows)
        progress = f"predict target ({'adapted' if shift is not None else 'unadapted'})"
        return generate_labels(
            GenerationSetup(self.model, self.device, self.generate), ControlCells(data, control_rows, reference),
            labels, seed, progress=progress, n_cells=n_cells,
        )  # fmt: skip
