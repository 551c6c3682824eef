"""A State run directory, loaded safely, and the calls the pipeline makes on its model.

``load_state_run(run_dir)`` reads ``config.yaml``, ``var_dims.pkl``, ``pert_onehot_map.pt``, the
optional ``batch_onehot_map.pkl`` / ``cell_type_onehot_map.pkl`` and the checkpoint
(``checkpoints/final.ckpt``, else ``last.ckpt`` / ``best.ckpt``, else the same names at the top of
the directory as some published checkpoints carry them, or one named explicitly) with
:mod:`ccfm.state.safe_load` (``data_module.torch``, a pickled Python object, is never read), and rebuilds arc-state's
``StateTransitionPerturbationModel`` itself: the class is fixed here, never taken by name from
the user's files, and its constructor arguments are the plain values the checkpoint recorded
(``hyper_parameters``). Options that would make arc-state load further files while building the
model (``finetune_vci_decoder``, which reads another checkpoint with an unrestricted
``torch.load``) are refused.

The calls used downstream:

* :func:`encode_basal` — the model's ``basal_encoder`` on expression (what the MMD shift
  adapter matches; the shift is applied to expression *before* it, never to an encoding);
* :func:`predict_cells` — ``predict_step`` on sets of ``cell_set_len`` control cells with one
  perturbation's one-hot (a double ``A+B`` the model never saw is the sum of its singles'
  one-hots, since State has no other way to compose perturbations).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ccfm import COMBO_SEPARATOR
from ccfm.state.safe_load import (
    RunDirError,
    UnsafeFileError,
    load_onehot_map,
    load_tensor_file,
    load_var_dims,
    load_yaml,
)

log = logging.getLogger(__name__)

REQUIRED_FILES = {
    "config.yaml": "State's training configuration (model name, data keys)",
    "var_dims.pkl": "State's var_dims.pkl: gene names and input/output dimensions",
    "pert_onehot_map.pt": "State's perturbation one-hot map",
}
CHECKPOINT_NAMES = ("final.ckpt", "last.ckpt", "best.ckpt")
# Written by `state tx train` beside the required files; loaded when present.
OPTIONAL_MAPS = {
    "batch_onehot_map.pkl": "State's batch one-hot map",
    "cell_type_onehot_map.pkl": "State's cell-type one-hot map",
}
SUPPORTED_MODELS = ("state", "pertsets", "neuralot")  # arc-state's names of its transition model
SUPPORTED_BACKBONES = ("llama", "GPT2")


def state_available() -> tuple[bool, str]:
    """Whether arc-state's transition model can be imported, and why not if it cannot."""
    try:
        from state.tx.models.state_transition import StateTransitionPerturbationModel  # noqa: F401
    except Exception as error:  # ImportError, or a broken dependency of it
        return False, f"{type(error).__name__}: {error}"
    return True, ""


@dataclass
class StateRun:
    """A loaded State run directory."""

    directory: Path
    checkpoint: Path
    model: torch.nn.Module
    config: dict[str, Any]
    var_dims: dict[str, Any]
    pert_map: dict[str, Tensor]
    genes: list[str]
    control_label: str
    cell_set_len: int
    gene_space: bool  # True: the model reads and writes expression (embed_key null / X_hvg)
    batch_map: dict[str, Any] | None = None  # batch_onehot_map.pkl, when the directory has one
    cell_type_map: dict[str, Any] | None = None  # cell_type_onehot_map.pkl, when the directory has one

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def find_checkpoint(run_dir: Path, checkpoint: str | Path | None = None) -> Path:
    """The checkpoint to load: ``checkpoint`` (relative to ``run_dir`` or absolute), else the first of
    :data:`CHECKPOINT_NAMES` under ``run_dir/checkpoints``."""
    if checkpoint is not None:
        path = Path(checkpoint)
        path = path if path.is_absolute() else run_dir / path
        if not path.is_file():
            shown = path.relative_to(run_dir) if path.is_relative_to(run_dir) else path
            raise RunDirError(f"{run_dir}: missing {shown} (the checkpoint asked for)")
        return path
    candidates = [f"checkpoints/{name}" for name in CHECKPOINT_NAMES] + list(CHECKPOINT_NAMES)
    for name in candidates:
        path = run_dir / name
        if path.is_file():
            return path
    raise RunDirError(
        f"{run_dir}: missing checkpoints/{CHECKPOINT_NAMES[0]} (no State checkpoint: looked for "
        f"{', '.join(candidates)})"
    )


def check_run_dir(run_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Raise :class:`RunDirError` naming every missing file of a State run directory; return the checkpoint."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: not a directory (expected a State run directory)")
    missing = [f"{name} ({what})" for name, what in REQUIRED_FILES.items() if not (run_dir / name).is_file()]
    if missing:
        raise RunDirError(f"{run_dir}: missing {'; '.join(missing)}")
    return find_checkpoint(run_dir, checkpoint)


def _model_hparams(
    checkpoint: Mapping[str, Any], config: Mapping[str, Any], var_dims: Mapping[str, Any], source: Path
) -> dict[str, Any]:
    """Constructor arguments of the transition model: the checkpoint's recorded hyper-parameters,
    or (older checkpoints) the same merge of config and var_dims that arc-state's training does."""
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, Mapping) and "input_dim" in hparams:
        hparams = dict(hparams)
    else:
        data, model, training = config["data"]["kwargs"], config["model"]["kwargs"], config.get("training", {})
        hparams = {**model, **training}
        hparams.update(
            input_dim=var_dims["input_dim"],
            output_dim=var_dims["output_dim"],
            pert_dim=var_dims["pert_dim"],
            batch_dim=var_dims.get("batch_dim"),
            gene_dim=var_dims["hvg_dim"] if data.get("output_space") == "gene" else var_dims.get("gene_dim"),
            hvg_dim=var_dims.get("hvg_dim"),
            embed_key=data.get("embed_key"),
            output_space=data.get("output_space", "gene"),
            gene_names=var_dims.get("gene_names"),
            control_pert=data.get("control_pert", "non-targeting"),
            basal_mapping_strategy=data.get("basal_mapping_strategy", "random"),
        )
    for key in ("input_dim", "output_dim", "pert_dim", "batch_dim", "gene_dim", "hvg_dim", "hidden_dim"):
        if isinstance(hparams.get(key), np.generic):
            hparams[key] = hparams[key].item()
    if hparams.get("finetune_vci_decoder"):
        raise UnsafeFileError(
            f"{source}: finetune_vci_decoder=True makes arc-state load a further checkpoint with an "
            "unrestricted torch.load while building the model; not supported by the safe loader"
        )
    backbone = hparams.get("transformer_backbone_key")
    if backbone not in SUPPORTED_BACKBONES:
        raise RunDirError(f"{source}: transformer_backbone_key {backbone!r} is not one of {SUPPORTED_BACKBONES}")
    hparams["transformer_backbone_kwargs"] = dict(hparams.get("transformer_backbone_kwargs") or {})
    return hparams


def load_state_run(
    run_dir: str | Path, *, checkpoint: str | Path | None = None, device: str | torch.device = "cpu"
) -> StateRun:
    """Load a State run directory without executing anything from it (see the module docstring)."""
    run_dir = Path(run_dir)
    ckpt_path = check_run_dir(run_dir, checkpoint)
    config = load_yaml(run_dir / "config.yaml", REQUIRED_FILES["config.yaml"])
    try:
        model_name = str(config["model"]["name"])
        data_kwargs = dict(config["data"]["kwargs"])
    except (KeyError, TypeError) as error:
        raise RunDirError(
            f"{run_dir / 'config.yaml'}: no model.name / data.kwargs ({error}); not a State training config"
        ) from error
    if model_name.lower() not in SUPPORTED_MODELS:
        raise RunDirError(
            f"{run_dir / 'config.yaml'}: model {model_name!r} is not State's transition model "
            f"({', '.join(SUPPORTED_MODELS)})"
        )
    var_dims = load_var_dims(run_dir / "var_dims.pkl")
    raw_map = load_tensor_file(run_dir / "pert_onehot_map.pt", REQUIRED_FILES["pert_onehot_map.pt"])
    if not isinstance(raw_map, Mapping) or not all(isinstance(v, Tensor) for v in raw_map.values()):
        raise RunDirError(f"{run_dir / 'pert_onehot_map.pt'}: expected a mapping of perturbation name -> tensor")
    pert_map = {str(k): v.float() for k, v in raw_map.items()}
    optional = {
        name: load_onehot_map(run_dir / name, what) if (run_dir / name).is_file() else None
        for name, what in OPTIONAL_MAPS.items()
    }
    ckpt = load_tensor_file(ckpt_path, "State checkpoint")
    state_dict = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(state_dict, Mapping):
        raise RunDirError(f"{ckpt_path}: holds no state_dict")
    hparams = _model_hparams(ckpt, config, var_dims, ckpt_path)

    available, why = state_available()
    if not available:
        raise ImportError(f"loading a State model needs arc-state (pip install -e '.[state]'): {why}")
    from state.tx.models.state_transition import StateTransitionPerturbationModel

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # the constructor prints the whole module tree
        model = StateTransitionPerturbationModel(**hparams)
    missing, unexpected = model.load_state_dict(dict(state_dict), strict=False)
    if missing or unexpected:
        raise RunDirError(
            f"{ckpt_path}: weights do not fit the model its hyper-parameters describe "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.to(device).eval().requires_grad_(False)
    genes = var_dims.get("gene_names") or hparams.get("gene_names")
    if not genes:
        raise RunDirError(f"{run_dir / 'var_dims.pkl'}: has no gene_names")
    embed_key = hparams.get("embed_key", data_kwargs.get("embed_key"))
    run = StateRun(
        directory=run_dir,
        checkpoint=ckpt_path,
        model=model,
        config=config,
        var_dims=var_dims,
        pert_map=pert_map,
        genes=[str(g) for g in genes],
        control_label=str(hparams.get("control_pert") or data_kwargs.get("control_pert", "non-targeting")),
        cell_set_len=int(hparams.get("cell_set_len", getattr(model, "cell_sentence_len", 256))),
        gene_space=embed_key in (None, "X_hvg"),
        batch_map=optional["batch_onehot_map.pkl"],
        cell_type_map=optional["cell_type_onehot_map.pkl"],
    )
    log.info(
        "loaded State model from %s (%s; %d genes, %d perturbations, cell sets of %d; optional maps: %s)",
        run_dir,
        ckpt_path.relative_to(run_dir) if ckpt_path.is_relative_to(run_dir) else ckpt_path,
        len(run.genes),
        len(pert_map),
        run.cell_set_len,
        ", ".join(f"{name} ({len(m)})" for name, m in optional.items() if m is not None) or "none",
    )
    return run


# --------------------------------------------------------------------------------------------
# Model calls
# --------------------------------------------------------------------------------------------


def encode_basal(run: StateRun, expression: Tensor) -> Tensor:
    """The model's basal encoding (B, hidden) of an expression batch (B, G); differentiable in it."""
    return run.model.encode_basal_expression(expression)


def perturbation_vector(run: StateRun, label: str) -> tuple[Tensor, list[str]]:
    """One-hot of ``label``; an unseen ``A+B`` is the sum of its parts' one-hots.

    Returns the vector and the parts State has no one-hot for (left out of the sum).
    """
    if label in run.pert_map:
        return run.pert_map[label], []
    parts = label.split(COMBO_SEPARATOR)
    known = [p for p in parts if p in run.pert_map]
    unknown = [p for p in parts if p not in run.pert_map]
    vector = torch.zeros_like(next(iter(run.pert_map.values())))
    for part in known:
        vector = vector + run.pert_map[part]
    return vector, unknown


@torch.no_grad()
def predict_cells(run: StateRun, controls: np.ndarray, label: str) -> np.ndarray:
    """State's prediction of ``label`` from the given control cells (n, G) -> (n, G), float32.

    The controls are fed in sets of ``cell_set_len`` (the last set may be shorter), one
    perturbation per set, through ``predict_step``; gene-space output is clamped at 0.
    """
    if not run.gene_space:
        raise ValueError(
            f"{run.directory}: the model works on an embedding (embed_key), not on expression; not supported here"
        )
    pert, _ = perturbation_vector(run, label)
    device = run.device
    out = []
    for start in range(0, controls.shape[0], run.cell_set_len):
        basal = torch.as_tensor(np.asarray(controls[start : start + run.cell_set_len], dtype=np.float32), device=device)
        batch = {"ctrl_cell_emb": basal, "pert_emb": pert.to(device).expand(basal.shape[0], -1)}
        result = run.model.predict_step(batch, 0, padded=False)
        # "preds" is the model's own output space (expression here); a gene decoder, if any,
        # maps to a different gene set and is not used.
        out.append(result["preds"].reshape(basal.shape[0], -1).clamp_min(0.0).cpu().numpy())
    return np.concatenate(out, axis=0).astype(np.float32)


def check_genes(run: StateRun, genes: Sequence[str], what: str) -> None:
    """The data must be on the model's genes, in the model's order."""
    if list(run.genes) != [str(g) for g in genes]:
        raise ValueError(
            f"{what} has {len(genes)} genes that differ from the {len(run.genes)} genes of the State model in "
            f"{run.directory} (or their order differs); preprocess the data on the model's genes"
        )
