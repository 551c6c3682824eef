"""The model file (``model.pt``): weights, model config, flow settings, vocabulary and mean model.

Written by :func:`save_model`, read by :func:`load_model` with ``weights_only=True`` (no pickle).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ccfm.data.perturbations import PerturbationVocab
from ccfm.io.atomic import write_binary_atomic
from ccfm.model.denoiser import CascadedDenoiser, FlowSettings
from ccfm.model.mean_model import MeanModel
from ccfm.model.model import CascadedFlowModel, ModelConfig

MODEL_FORMAT = "ccfm-model-v1"


def save_model(
    path: str | Path,
    denoiser: CascadedDenoiser,
    vocab: PerturbationVocab,
    metadata: Mapping[str, Any] | None = None,
    mean_model: MeanModel | None = None,
) -> None:
    """Write ``model.pt``: weights + model config + flow settings + genes + vocabulary (JSON-able),
    and the mean model (tensors + JSON) of an anchored flow."""
    payload: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in denoiser.model.state_dict().items()},
        "model_config": json.dumps(denoiser.model.config.to_dict()),
        "flow_settings": json.dumps(denoiser.settings.to_dict()),
        "vocab": json.dumps(vocab.to_dict()),
        "metadata": json.dumps(dict(metadata or {})),
    }
    if mean_model is not None:
        payload["mean_model"] = mean_model.to_payload()
    write_binary_atomic(path, functools.partial(torch.save, payload))


@dataclass
class LoadedModel:
    denoiser: CascadedDenoiser
    vocab: PerturbationVocab
    metadata: dict[str, Any] = field(default_factory=dict)
    mean_model: MeanModel | None = None

    @property
    def genes(self) -> list[str]:
        return self.vocab.genes


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the denoiser saved by :func:`save_model` (``weights_only=True``: no pickle)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run the train_ccfm rule first")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not a CCFM model file (format {payload.get('format')!r}); retrain with train_ccfm")
    config = ModelConfig.from_dict(json.loads(payload["model_config"]))
    flow = json.loads(payload["flow_settings"])
    # Files written before these keys existed trained with the start cell as the network's
    # control input and independent pairs: rebuild them as they were trained.
    flow.setdefault("condition_cell", "start")
    flow.setdefault("coupling", "independent")
    settings = FlowSettings(**flow)
    denoiser = CascadedDenoiser(CascadedFlowModel(config), settings)
    denoiser.model.load_state_dict(payload["state_dict"])
    denoiser.to(device).eval()
    mean_model = MeanModel.from_payload(payload["mean_model"]) if "mean_model" in payload else None
    return LoadedModel(
        denoiser, PerturbationVocab.from_dict(json.loads(payload["vocab"])), json.loads(payload["metadata"]), mean_model
    )
