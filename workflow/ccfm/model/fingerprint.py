"""What makes two training runs the same: the run fingerprint, the inputs' identity, resume checks.

A checkpoint under ``resume/`` is resumed only when its fingerprint equals the current run's:
settings, genes, labels, seed and the identity of every input (data, split, latent stats, scGPT
checkpoint, latent settings). Checkpoints also carry one short hash per part, so a mismatch can
name what changed (:func:`mismatch_reason`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccfm.data.perturbations import PerturbationVocab
from ccfm.io.h5ad import file_identity
from ccfm.model.denoiser import CascadedDenoiser

if TYPE_CHECKING:
    from ccfm.model.trainer import TrainSettings


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


def mismatch_reason(state: Mapping[str, Any], run_fingerprint: str, fingerprint_parts: Mapping[str, str]) -> str:
    """Which fingerprint parts differ between a checkpoint's ``state`` and this run, in words."""
    saved = state.get("fingerprint_parts") or {}
    changed = sorted(
        name for name in set(saved) | set(fingerprint_parts) if saved.get(name) != fingerprint_parts.get(name)
    )
    if saved and changed:
        return "it belongs to another run: changed since it was written: " + ", ".join(changed)
    return (
        f"it belongs to another run (fingerprint {state.get('fingerprint')} != {run_fingerprint}; "
        "written by an older version or another configuration)"
    )
