"""The pipeline method ``state``: Arc Institute's State transition model, trained by arc-state itself.

:func:`train_state_to_files` writes the fold's training cells (the split's ``train`` list plus
the controls of ``processed.h5ad``, log1p expression, canonical labels) as one h5ad and the
cell-load TOML naming it as the only training dataset, then runs arc-state's own training entry
point, ``python -m state tx train`` (the ``state tx train`` CLI), with Hydra overrides built from
the config section ``state`` (:func:`train_overrides`). The run directory it writes
(``config.yaml``, ``var_dims.pkl``, ``pert_onehot_map.pt``, ``checkpoints/final.ckpt``) is then
loaded back with the safe loader as a check, and its loss log copied to ``loss.tsv``.

Availability: :func:`state_status` decides, without importing arc-state, whether the method
runs: ``state.enabled: auto`` (default) runs it where the ``arc-state`` distribution is
installed and skips it otherwise; ``true`` requires it; ``false`` turns it off. The environment
variable ``CCFM_HIDE_ARC_STATE=1`` makes an installed arc-state count as absent (used by the
tests of the skip path).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from ccfm import CONTROL_LABEL, PERT_COLUMN
from ccfm.config import section_defaults
from ccfm.io.h5ad import CHUNK_SIZE, read_rows_with_labels, write_h5ad_atomic
from ccfm.io.splits import read_split

log = logging.getLogger(__name__)

# enabled (auto | true | false), steps, batch_size (cell sets per step), cell_set_len, hidden_dim,
# layers and heads (of the transformer), lr, overrides (extra Hydra overrides of `state tx
# train`), run_dir (a State run directory for the adapter instead of the fold's own model).
STATE_DEFAULTS: dict[str, Any] = section_defaults("state")
HIDE_ENV = "CCFM_HIDE_ARC_STATE"
DISTRIBUTION = "arc-state"
CELL_TYPE = "source"
BATCH = "batch0"


def arc_state_version() -> str | None:
    """The installed arc-state version, or None (no import of arc-state itself)."""
    if os.environ.get(HIDE_ENV, "") not in ("", "0"):
        return None
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def state_status(settings: Mapping[str, Any]) -> tuple[bool, str]:
    """(runs, reason) of the ``state`` method for one dataset's merged ``state`` settings."""
    enabled = settings.get("enabled", "auto")
    if enabled is False:
        return False, "state: skipped (state.enabled is false)"
    version = arc_state_version()
    if version is None:
        if enabled is True:
            raise RuntimeError(
                "state.enabled is true but arc-state is not installed: pip install -e '.[state]' "
                "(or set state.enabled: auto to skip the method)"
            )
        return (
            False,
            "state: skipped, arc-state is not installed "
            "(pip install -e '.[state]' adds Arc's State as a scored method)",
        )
    return True, f"state: arc-state {version} found, State is trained and scored"


def write_training_cells(
    processed_h5ad: str | Path, split_json: str | Path, out_h5ad: str | Path, *, chunk_size: int = CHUNK_SIZE
) -> ad.AnnData:
    """The fold's training cells (split ``train`` labels and the controls) in cell-load's layout.

    ``obs``: ``target_gene`` (canonical labels), ``cell_type`` and ``batch`` (one value each:
    a fold is one context). ``X``: log1p expression of ``processed.h5ad`` (CSR float32).
    """
    split = read_split(split_json)
    leaked = sorted(set(split["train"]) & set(split["test"]))
    if leaked:
        raise ValueError(f"{split_json}: perturbations in both train and test: {leaked[:10]}")
    keep = set(split["train"]) | {CONTROL_LABEL}
    rows = read_rows_with_labels(processed_h5ad, lambda labels: np.isin(labels, sorted(keep)), chunk_size=chunk_size)
    labels = np.asarray(rows.labels).astype(str)
    if not (labels == CONTROL_LABEL).any() or (labels != CONTROL_LABEL).sum() == 0:
        raise ValueError(f"{processed_h5ad}: the fold needs control cells and perturbed training cells to train State")
    obs = pd.DataFrame(
        {
            PERT_COLUMN: pd.Categorical(labels),
            "cell_type": pd.Categorical([CELL_TYPE] * len(labels)),
            "batch": pd.Categorical([BATCH] * len(labels)),
        },
        index=pd.Index(rows.cell_names, dtype=str),
    )
    adata = ad.AnnData(
        X=rows.matrix.astype(np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(rows.genes, dtype=str))
    )
    write_h5ad_atomic(adata, out_h5ad)
    log.info(
        "State training cells: %d (%d controls, %d perturbations) x %d genes -> %s",
        adata.n_obs,
        int((labels == CONTROL_LABEL).sum()),
        len(set(labels) - {CONTROL_LABEL}),
        adata.n_vars,
        out_h5ad,
    )
    return adata


def write_cell_load_toml(path: str | Path, train_h5ad: str | Path, name: str = "fold") -> None:
    """cell-load's experiment TOML: one dataset, trained on whole (no validation/test split)."""
    Path(path).write_text(f'[datasets]\n{name} = "{Path(train_h5ad).resolve()}"\n\n[training]\n{name} = "train"\n')


def train_overrides(
    settings: Mapping[str, Any], toml_path: str | Path, output_dir: str | Path, name: str, seed: int
) -> list[str]:
    """Hydra overrides of ``state tx train`` for the pipeline: data keys of the canonical files, a
    small transition model (``model=state_sm`` shrunk by the ``state`` settings; add
    ``model=state`` and larger sizes via ``state.overrides`` for the documented GPU setting), no
    W&B, no validation split, one final checkpoint."""
    steps = int(settings["steps"])
    heads = int(settings["heads"])
    hidden = int(settings["hidden_dim"])
    if hidden % heads:
        raise ValueError(f"state.hidden_dim ({hidden}) must be a multiple of state.heads ({heads})")
    backbone = "model.kwargs.transformer_backbone_kwargs"
    overrides = [
        f"data.kwargs.toml_config_path={Path(toml_path).resolve()}",
        "data.kwargs.embed_key=null",
        "data.kwargs.output_space=gene",
        f"data.kwargs.pert_col={PERT_COLUMN}",
        "data.kwargs.cell_type_key=cell_type",
        "data.kwargs.batch_col=batch",
        f"data.kwargs.control_pert={CONTROL_LABEL}",
        "data.kwargs.num_workers=0",
        "data.kwargs.pin_memory=false",
        "model=state_sm",
        f"model.kwargs.cell_set_len={int(settings['cell_set_len'])}",
        f"model.kwargs.hidden_dim={hidden}",
        "model.kwargs.n_encoder_layers=1",
        "model.kwargs.n_decoder_layers=1",
        f"{backbone}.intermediate_size={2 * hidden}",
        f"{backbone}.num_hidden_layers={int(settings['layers'])}",
        f"{backbone}.num_attention_heads={heads}",
        f"{backbone}.num_key_value_heads={heads}",
        f"{backbone}.head_dim={hidden // heads}",
        f"training.max_steps={steps}",
        f"training.batch_size={int(settings['batch_size'])}",
        f"training.lr={float(settings['lr'])}",
        f"training.train_seed={int(seed)}",
        f"training.val_freq={steps + 1}",
        f"training.ckpt_every_n_steps={steps}",
        f"+training.log_every_n_steps={max(1, steps // 40)}",
        "use_wandb=false",
        "overwrite=true",
        f"output_dir={Path(output_dir).resolve()}",
        f"name={name}",
    ]
    return overrides + [str(o) for o in settings.get("overrides") or []]


def _subprocess_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        WANDB_MODE="disabled",
        WANDB_DISABLED="true",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def write_loss_table(run_dir: Path, out_tsv: str | Path) -> pd.DataFrame:
    """``loss.tsv`` (step, loss) from the CSV log State's trainer writes (``version_0/metrics.csv``)."""
    metrics = run_dir / "version_0" / "metrics.csv"
    columns = ["step", "loss"]
    frame = pd.DataFrame(columns=columns)
    if metrics.is_file():
        raw = pd.read_csv(metrics)
        loss_col = next((c for c in ("train_loss", "train/loss", "train_loss_step") if c in raw.columns), None)
        if loss_col is not None and "step" in raw.columns:
            frame = raw[["step", loss_col]].dropna().rename(columns={loss_col: "loss"})
    frame.to_csv(out_tsv, sep="\t", index=False)
    return frame


@dataclass(frozen=True)
class StateTrainFiles:
    """The fold's data (``processed.h5ad``, its split) and what training writes: the State run directory
    (``output_dir/name`` in arc-state's terms; the training h5ad and TOML go beside it, in its
    parent) and ``loss.tsv``."""

    processed_h5ad: str | Path
    split_json: str | Path
    run_dir: str | Path
    loss_tsv: str | Path


def train_state_to_files(
    files: StateTrainFiles,
    settings: Mapping[str, Any],
    *,
    seed: int,
    threads: int = 1,
    log_path: str | Path | None = None,
) -> Path:
    """Train State on the fold's training cells with ``state tx train``; return the run directory."""
    merged = {**STATE_DEFAULTS, **dict(settings)}
    run_dir = Path(files.run_dir)
    work = run_dir.parent
    work.mkdir(parents=True, exist_ok=True)
    train_h5ad, toml_path = work / "train_cells.h5ad", work / "cell_load.toml"
    write_training_cells(files.processed_h5ad, files.split_json, train_h5ad)
    write_cell_load_toml(toml_path, train_h5ad)
    command = [
        sys.executable,
        "-m",
        "state",
        "tx",
        "train",
        *train_overrides(merged, toml_path, work, run_dir.name, seed),
    ]
    log.info("training State with arc-state's entry point: %s", " ".join(command))
    start = time.monotonic()
    sink = open(log_path, "a") if log_path else None
    try:
        result = subprocess.run(
            command,
            cwd=work,
            env=_subprocess_env(threads),
            stdout=sink or subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    finally:
        if sink:
            sink.close()
    if result.returncode != 0:
        tail = "" if sink else "\n" + (result.stdout or "")[-4000:]
        raise RuntimeError(
            f"state tx train failed (exit {result.returncode}); its output is in {log_path or 'the text below'}{tail}"
        )
    log.info("State trained in %.0f s", time.monotonic() - start)
    # Loading it back through the safe loader is the check that the run directory is complete.
    from ccfm.state.model import load_state_run

    load_state_run(run_dir)
    write_loss_table(run_dir, files.loss_tsv)
    train_h5ad.unlink(missing_ok=True)
    return run_dir
