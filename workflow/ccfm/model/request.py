"""One training run's request: the files it reads and writes and the config it runs with.

The ``train_ccfm`` rule builds one (``workflow/scripts/train_ccfm.py``), tests and benchmarks build
their own; a multi-process run sends it to every torchrun worker as JSON (:meth:`TrainRequest.to_json`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, kw_only=True)
class TrainRequest:
    """What :func:`ccfm.model.training.train_from_files` trains from and writes.

    The sections are the merged ``model``, ``train`` and ``latent`` config sections of the dataset;
    ``scgpt_dir``, ``gene_vocab_tsv`` and ``latent_stats`` are needed by latent runs only.
    """

    processed_h5ad: str | Path
    split_json: str | Path
    out_model: str | Path
    out_loss: str | Path
    resume_dir: str | Path  # checkpoint.pt, the scGPT feature cache, a multi-process launch.json
    model_section: Mapping[str, Any]
    train_section: Mapping[str, Any]
    latent_section: Mapping[str, Any]
    seed: int
    use_latent: bool
    scgpt_dir: str | Path | None = None
    gene_vocab_tsv: str | Path | None = None
    latent_stats: str | Path | None = None
    perturbation_type: str = "gene"
    extra_labels: Sequence[str] = ()  # the dataset's `predict:` labels (embedded, never trained on)

    def to_json(self) -> str:
        """JSON text of every field (paths as strings); ``TrainRequest(**json.loads(text))`` reads it back."""
        return json.dumps(asdict(self), indent=2, default=str)
