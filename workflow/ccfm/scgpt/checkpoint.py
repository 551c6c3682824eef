"""scGPT checkpoints: build the local ``tiny`` model, load any checkpoint strictly, fetch whole-human.

A checkpoint directory holds ``best_model.pt`` (a state dict), ``vocab.json`` (gene symbol -> id,
plus ``<pad>``, ``<cls>``, ``<eoc>``) and ``args.json`` (the pretraining hyper-parameters).

Published scGPT checkpoints were trained with flash-attn: their attention weights are stored as
``...self_attn.Wqkv.{weight,bias}``, which PyTorch's ``nn.MultiheadAttention`` calls
``in_proj_{weight,bias}`` (same q|k|v row order, so it is a pure rename). scGPT's own loader uses
``strict=False`` and silently drops anything that does not match; here every key is accounted for:
the parameters the feature extractor uses (gene/value encoders, transformer) must all be present
with the right shapes, and the only keys allowed to be absent or left over are those of output
heads the extractor never runs (listed in :data:`HEAD_PREFIXES`, and logged by name).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ccfm.io.atomic import write_binary_atomic, write_text_atomic
from ccfm.scgpt.compat import census_vocab_path, transformer_model_class

log = logging.getLogger(__name__)

CHECKPOINT_FILES = ("best_model.pt", "vocab.json", "args.json")
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")

# Keys args.json must have for us to rebuild the architecture and prepare inputs.
REQUIRED_ARGS = (
    "pad_token",
    "input_style",
    "input_emb_style",
    "n_bins",
    "max_seq_len",
    "nlayers",
    "nheads",
    "embsize",
    "d_hid",
    "dropout",
    "n_layers_cls",
    "pad_value",
    "MVC",
)

# Parameters `_encode` does not use: output heads of the pretraining objectives. The published
# whole-human checkpoint comes from generative pretraining: it has a `flag_encoder` and no
# `cls_decoder`, so these may be missing from a checkpoint or present without a counterpart.
HEAD_PREFIXES = ("decoder.", "cls_decoder.", "mvc_decoder.", "flag_encoder.", "grad_reverse_discriminator.")

# Values of the real whole-human args.json that a tiny model keeps (only the sizes change).
_PRETRAINING_ARGS_TEMPLATE: dict[str, Any] = {
    "data_source": "tiny-random-init",
    "save_dir": "resources/scgpt/tiny",
    "load_model": None,
    "n_hvg": None,
    "valid_size_or_ratio": 0.003,
    "dist_backend": "nccl",
    "grad_accu_steps": 1,
    "pad_token": "<pad>",
    "input_style": "binned",
    "input_emb_style": "continuous",
    "n_bins": 51,
    "max_seq_len": 1200,
    "training_tasks": "both",
    "dist_url": "",
    "mask_ratio": [0.25, 0.5, 0.75],
    "trunc_by_sample": True,
    "vocab_path": "scgpt/tokenizer/default_census_vocab.json",
    "rank": 0,
    "batch_size": 32,
    "eval_batch_size": 64,
    "epochs": 0,
    "lr": 0.0001,
    "scheduler_interval": 100,
    "scheduler_factor": 0.99,
    "warmup_ratio_or_step": 10000.0,
    "no_cls": True,
    "no_cce": True,
    "fp16": True,
    "fast_transformer": True,
    "nlayers": 12,
    "nheads": 8,
    "embsize": 512,
    "d_hid": 512,
    "dropout": 0.2,
    "n_layers_cls": 3,
    "log_interval": 9000,
    "save_interval": 27000,
    "mask_value": -1,
    "pad_value": -2,
    "USE_CLS": False,
    "USE_CCE": False,
    "MVC": True,
    "USE_GENERATIVE_TRAINING": True,
    "world_size": 1,
    "distributed": False,
    "local_rank": 0,
    "gpu": 0,
}

_LAYER_KEY = re.compile(r"^transformer_encoder\.layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete or its files do not agree with each other."""


def check_checkpoint_dir(model_dir: Path) -> dict[str, Path]:
    """Paths of the three checkpoint files; a clear error naming any that is missing."""
    model_dir = Path(model_dir)
    paths = {name: model_dir / name for name in CHECKPOINT_FILES}
    missing = [name for name, path in paths.items() if not path.is_file()]
    if missing:
        raise CheckpointError(
            f"scGPT checkpoint directory {model_dir} lacks {', '.join(missing)}; it must contain "
            f"{', '.join(CHECKPOINT_FILES)} (for whole-human, download them from the scGPT model zoo "
            "and put them there by hand, or run the scgpt_download rule)"
        )
    return paths


def read_args(path: Path) -> dict[str, Any]:
    """Read args.json and check it has every key the architecture needs."""
    try:
        args = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); re-download the checkpoint") from error
    missing = [key for key in REQUIRED_ARGS if key not in args]
    if missing:
        raise CheckpointError(f"{path} lacks required key(s) {missing}; is it an scGPT args.json?")
    if args["input_style"] not in ("binned", "normed_raw", "log1p"):
        raise CheckpointError(f"{path}: unsupported input_style {args['input_style']!r}")
    return args


def read_vocab(path: Path, pad_token: str = "<pad>") -> dict[str, int]:
    """Read vocab.json (token -> id); ids must be 0..n-1 and contain ``pad_token``."""
    vocab = json.loads(Path(path).read_text())
    if not isinstance(vocab, dict) or not vocab:
        raise CheckpointError(f"{path} must be a non-empty JSON object mapping gene symbol -> id")
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise CheckpointError(f"{path}: token ids are not exactly 0..{len(ids) - 1}")
    if pad_token not in vocab:
        raise CheckpointError(f"{path} has no pad token {pad_token!r}")
    return {str(k): int(v) for k, v in vocab.items()}


def census_vocab_with_specials() -> dict[str, int]:
    """The real scGPT gene vocabulary (from the wheel) plus ``<pad>``, ``<cls>``, ``<eoc>``."""
    vocab = {str(k): int(v) for k, v in json.loads(census_vocab_path().read_text()).items()}
    next_id = max(vocab.values()) + 1
    for token in SPECIAL_TOKENS:
        if token not in vocab:
            vocab[token] = next_id
            next_id += 1
    return vocab


# ----------------------------------------------------------------------------- key conversion


def to_pytorch_attention_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename flash-attn fused ``self_attn.Wqkv.*`` keys to ``nn.MultiheadAttention`` ``in_proj_*``."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new_key = key.replace("self_attn.Wqkv.weight", "self_attn.in_proj_weight").replace(
            "self_attn.Wqkv.bias", "self_attn.in_proj_bias"
        )
        if new_key in renamed:
            raise CheckpointError(f"checkpoint has both {key} and {new_key}: ambiguous attention weights")
        renamed[new_key] = value
    return renamed


def to_flash_attention_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_pytorch_attention_names` (how published checkpoints are stored)."""
    return {
        key.replace("self_attn.in_proj_weight", "self_attn.Wqkv.weight").replace(
            "self_attn.in_proj_bias", "self_attn.Wqkv.bias"
        ): value
        for key, value in state.items()
    }


def _is_head_key(key: str) -> bool:
    return key.startswith(HEAD_PREFIXES)


# ----------------------------------------------------------------------------- building


def build_model(args: Mapping[str, Any], vocab: Mapping[str, int]) -> nn.Module:
    """A randomly initialised real ``TransformerModel`` with the architecture ``args`` describe.

    flash-attn is never used (``use_fast_transformer=False``): weights are converted instead.
    """
    TransformerModel = transformer_model_class()
    emb_style = args["input_emb_style"]
    return TransformerModel(
        ntoken=len(vocab),
        d_model=int(args["embsize"]),
        nhead=int(args["nheads"]),
        d_hid=int(args["d_hid"]),
        nlayers=int(args["nlayers"]),
        nlayers_cls=int(args["n_layers_cls"]),
        n_cls=1,
        vocab=dict(vocab),
        dropout=float(args["dropout"]),
        pad_token=args["pad_token"],
        pad_value=int(args["pad_value"]),
        do_mvc=bool(args["MVC"]),
        input_emb_style=emb_style,
        n_input_bins=int(args["n_bins"]) + 2 if emb_style == "category" else None,
        use_fast_transformer=False,
        pre_norm=bool(args.get("pre_norm", False)),
    )


def build_tiny_checkpoint(
    out_dir: Path, seed: int, embsize: int = 32, nlayers: int = 2, nheads: int = 4, d_hid: int = 64
) -> Path:
    """Write a small randomly initialised scGPT checkpoint to ``out_dir``; return ``out_dir``.

    Same files, keys and format as the published whole-human checkpoint: the real census gene
    vocabulary with the three special tokens, an args.json with the real key set, and a state
    dict stored with flash-attn names (``Wqkv``), a ``flag_encoder`` and no ``cls_decoder`` — so
    loading it exercises exactly the conversion the real checkpoint needs. Deterministic in
    ``seed``; the global torch RNG is left untouched.
    """
    if embsize % nheads:
        raise ValueError(f"embsize ({embsize}) must be divisible by nheads ({nheads})")
    out_dir = Path(out_dir)
    vocab = census_vocab_with_specials()
    args = dict(_PRETRAINING_ARGS_TEMPLATE)
    args.update({"embsize": embsize, "nlayers": nlayers, "nheads": nheads, "d_hid": d_hid, "save_dir": str(out_dir)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(args, vocab)
        # generative pretraining's input flag embedding (2 x embsize), stored like the real file
        flag_encoder = torch.empty(2, embsize).uniform_(-0.1, 0.1)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("cls_decoder.")}
    state["flag_encoder.weight"] = flag_encoder
    state = to_flash_attention_names(state)
    write_text_atomic(out_dir / "vocab.json", json.dumps(vocab, indent=1))
    write_text_atomic(out_dir / "args.json", json.dumps(args, indent=2))
    write_binary_atomic(out_dir / "best_model.pt", functools.partial(torch.save, state))
    log.info("built tiny scGPT (%d layers, width %d, %d tokens) in %s", nlayers, embsize, len(vocab), out_dir)
    return out_dir


# ----------------------------------------------------------------------------- loading


def _check_args_match_weights(
    args: Mapping[str, Any], vocab: Mapping[str, int], state: Mapping[str, torch.Tensor], where: Path
) -> None:
    """Shapes the args and vocab imply must be those stored in the weights."""
    problems = []
    emb = state.get("encoder.embedding.weight")
    if emb is not None and tuple(emb.shape) != (len(vocab), int(args["embsize"])):
        problems.append(
            f"encoder.embedding.weight has shape {tuple(emb.shape)} but vocab.json has {len(vocab)} tokens "
            f"and args.json embsize={args['embsize']}"
        )
    layers = {int(m.group(1)) for key in state if (m := _LAYER_KEY.match(key))}
    if layers and len(layers) != int(args["nlayers"]):
        problems.append(f"best_model.pt has {len(layers)} transformer layers but args.json nlayers={args['nlayers']}")
    lin = state.get("transformer_encoder.layers.0.linear1.weight")
    if lin is not None and tuple(lin.shape) != (int(args["d_hid"]), int(args["embsize"])):
        problems.append(
            f"linear1 weight has shape {tuple(lin.shape)} but args.json says d_hid={args['d_hid']}, "
            f"embsize={args['embsize']}"
        )
    if int(args["embsize"]) % int(args["nheads"]):
        problems.append(f"args.json embsize={args['embsize']} is not divisible by nheads={args['nheads']}")
    if problems:
        raise CheckpointError(
            f"the files in {where} do not belong together: "
            + "; ".join(problems)
            + ". Use best_model.pt, vocab.json and args.json of the same checkpoint."
        )


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], where: Path) -> None:
    """Load ``state`` into ``model``; every non-head key must match exactly (name and shape)."""
    state = to_pytorch_attention_names(state)
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state and not _is_head_key(k))
    unexpected = sorted(k for k in state if k not in expected and not _is_head_key(k))
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in state
        if k in expected and not _is_head_key(k) and state[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{where} does not match the scGPT TransformerModel built from its args.json: "
            f"missing keys {missing}; unexpected keys {unexpected}; shape mismatches {mismatched}"
        )
    head_loaded = {k: v for k, v in state.items() if _is_head_key(k) and k in expected and v.shape == expected[k].shape}
    head_skipped = sorted(k for k in state if _is_head_key(k) and k not in head_loaded)
    head_absent = sorted(k for k in expected if _is_head_key(k) and k not in state)
    to_load = {k: v for k, v in state.items() if not _is_head_key(k)} | head_loaded
    result = model.load_state_dict(to_load, strict=False)
    # everything not loaded must be an absent head, nothing else (guards against a silent drop)
    if sorted(result.missing_keys) != head_absent or result.unexpected_keys:
        raise CheckpointError(f"{where}: unexpected load result {result}")
    if head_skipped or head_absent:
        log.info(
            "%s: output heads unused by feature extraction — not in the model: %s; not in the checkpoint: %s",
            where,
            head_skipped,
            head_absent,
        )


def load_scgpt(model_dir: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, int], dict[str, Any]]:
    """Load a checkpoint directory into the real scGPT ``TransformerModel`` (eval mode, frozen).

    Returns ``(model, vocab, args)``. Raises :class:`CheckpointError` for a missing file, an
    args.json that does not describe the stored weights, or any missing/unexpected weight.
    """
    model_dir = Path(model_dir)
    paths = check_checkpoint_dir(model_dir)
    args = read_args(paths["args.json"])
    vocab = read_vocab(paths["vocab.json"], args["pad_token"])
    if "<cls>" not in vocab:
        raise CheckpointError(f"{paths['vocab.json']} has no '<cls>' token; scGPT feature extraction needs it")
    try:
        state = torch.load(paths["best_model.pt"], map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"cannot read {paths['best_model.pt']} as a weights-only state dict ({error}); re-download it"
        ) from error
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{paths['best_model.pt']} holds {type(state).__name__}, not a state dict")
    state = to_pytorch_attention_names(state)
    _check_args_match_weights(args, vocab, state, model_dir)
    model = build_model(args, vocab)
    load_state_strict(model, state, paths["best_model.pt"])
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.to(device), vocab, args


# ----------------------------------------------------------------------------- whole-human download


# Smallest plausible sizes of the published files (best_model.pt ~196 MB, vocab.json ~1.3 MB).
MIN_SIZES = {"best_model.pt": 100_000_000, "vocab.json": 500_000, "args.json": 200}


def verify_checkpoint_files(model_dir: Path, min_sizes: Mapping[str, int] | None = None) -> None:
    """What can be verified without a published checksum: presence, sizes, args keys, loadable."""
    paths = check_checkpoint_dir(model_dir)
    for name, minimum in (min_sizes or {}).items():
        size = paths[name].stat().st_size
        if size < minimum:
            raise CheckpointError(
                f"{paths[name]} is {size} bytes, smaller than the expected >= {minimum}: incomplete download? "
                "Delete it and download again."
            )
    load_scgpt(model_dir, device="cpu")


def manual_download_message(out_dir: Path, folder_id: str) -> str:
    return (
        f"Download the scGPT whole-human checkpoint by hand from https://drive.google.com/drive/folders/{folder_id} "
        f"and put best_model.pt, vocab.json and args.json into {out_dir}/ (then rerun)."
    )


def download_checkpoint_http(
    base_url: str,
    out_dir: Path,
    sha256: Mapping[str, str] | None = None,
    min_sizes: Mapping[str, int] | None = None,
    timeout: float = 30.0,
    allow_http: bool = False,
) -> Path:
    """Fetch ``{base_url}/{best_model.pt,vocab.json,args.json}`` (a mirror) with resume and checksums.

    Uses :func:`ccfm.data.download.download_file`; files already present are verified, not re-fetched.
    ``allow_http`` (config ``scgpt.allow_http``) accepts an http mirror; https otherwise.
    """
    from ccfm.data.download import download_file, verify_checksum

    out_dir = Path(out_dir)
    digests = dict(sha256 or {})
    unknown = sorted(set(digests) - set(CHECKPOINT_FILES))
    if unknown:
        raise ValueError(
            f"sha256 given for unknown checkpoint file(s) {unknown}; expected keys among {CHECKPOINT_FILES}"
        )
    for name in CHECKPOINT_FILES:
        dest = out_dir / name
        if dest.is_file():
            verify_checksum(dest, sha256=digests.get(name))
            continue
        download_file(
            f"{base_url.rstrip('/')}/{name}", dest, sha256=digests.get(name), timeout=timeout, allow_http=allow_http
        )
    verify_checkpoint_files(out_dir, MIN_SIZES if min_sizes is None else min_sizes)
    return out_dir


def _gdown_folder(gdown: Any, folder_id: str, staging: Path) -> None:
    """``gdown.download_folder`` with resume where the installed gdown supports it (>= 5)."""
    try:
        gdown.download_folder(id=folder_id, output=str(staging), quiet=False, resume=True)
    except TypeError:  # older gdown without the resume argument
        gdown.download_folder(id=folder_id, output=str(staging), quiet=False)


def download_whole_human(
    out_dir: Path,
    folder_id: str,
    mirror_url: str | None = None,
    sha256: Mapping[str, str] | None = None,
    min_sizes: Mapping[str, int] | None = None,
    allow_http: bool = False,
) -> Path:
    """Fetch the whole-human checkpoint into ``out_dir`` and verify it.

    With ``mirror_url`` (an HTTP(S) directory holding the three files) the files are fetched with
    resume and optional sha256 checks. Otherwise the scGPT model-zoo Google Drive folder is
    fetched with ``gdown`` (an optional dependency). Files already present are kept. Without gdown,
    or offline, fails fast with instructions for placing the three files by hand.
    """
    out_dir = Path(out_dir)
    sizes = MIN_SIZES if min_sizes is None else min_sizes
    if mirror_url:
        return download_checkpoint_http(mirror_url, out_dir, sha256, sizes, allow_http=allow_http)
    if all((out_dir / name).is_file() for name in CHECKPOINT_FILES):
        log.info("all checkpoint files already present in %s; verifying", out_dir)
        verify_checkpoint_files(out_dir, sizes)
        return out_dir
    try:
        import gdown  # optional: only users who are online need it
    except ImportError as error:
        raise RuntimeError(
            "the Python package 'gdown' (Google Drive downloader) is not installed. Install it with "
            "`pip install 'ccfm[download]'` (or `pip install 'gdown>=5'`) and rerun. "
            + manual_download_message(out_dir, folder_id)
        ) from error
    out_dir.mkdir(parents=True, exist_ok=True)
    # kept after a failure so the next run resumes the partial files
    staging = out_dir / ".gdrive-download"
    staging.mkdir(exist_ok=True)
    try:
        _gdown_folder(gdown, folder_id, staging)
    except Exception as error:
        raise RuntimeError(
            f"downloading the Drive folder failed ({error}); partial files are kept in {staging} and the "
            "next run resumes them. " + manual_download_message(out_dir, folder_id)
        ) from error
    for name in CHECKPOINT_FILES:
        if (out_dir / name).is_file():
            continue
        found = sorted(staging.rglob(name))
        if not found:
            raise RuntimeError(f"the Drive folder had no {name}. " + manual_download_message(out_dir, folder_id))
        os.replace(found[0], out_dir / name)
    shutil.rmtree(staging, ignore_errors=True)
    if sha256:
        from ccfm.data.download import verify_checksum

        for name, digest in sha256.items():
            verify_checksum(out_dir / name, sha256=digest)
    verify_checkpoint_files(out_dir, sizes)
    return out_dir
