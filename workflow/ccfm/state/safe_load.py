"""Loading the files of a State run directory without executing anything from it.

A State run directory (what ``state tx train`` writes, or what a Virtual Cell Challenge
participant downloads) holds ``config.yaml``, ``var_dims.pkl``, ``pert_onehot_map.pt`` and a
Lightning checkpoint under ``checkpoints/``. Two of those are pickles, and unpickling runs
whatever callables the file names. Here:

* ``var_dims.pkl`` goes through :class:`RestrictedUnpickler`, which resolves only plain
  containers, strings, numbers and numpy arrays/scalars (plus the numpy reconstruct helpers and
  ``dtype`` those need) and refuses any other global with :class:`UnsafeFileError` *before*
  calling it; the result is walked again and must consist of those types only.
* ``.pt`` / ``.ckpt`` files go through ``torch.load(weights_only=True)``: torch's own
  restricted unpickler (tensors, containers, primitive types). A Lightning checkpoint written
  by ``state tx train`` needs nothing beyond :data:`CHECKPOINT_SAFE_GLOBALS`, which lists by
  name the few plain types it stores; anything else is refused.
* the optional one-hot maps arc-state writes with plain ``pickle.dump`` (``batch_onehot_map.pkl``,
  ``cell_type_onehot_map.pkl``: dicts of one-hot tensors) go through :class:`TensorMapUnpickler`:
  the restricted unpickler plus the two globals a pickled CPU tensor names,
  ``torch._utils._rebuild_tensor_v2`` (also on torch's own weights-only list) and
  ``torch.storage._load_from_bytes``, which is *replaced* by a ``torch.load(weights_only=True)`` of
  the storage bytes; the result must be a mapping of names to tensors or plain values.
  ``data_module.torch`` (a whole pickled Python object) is never read.
* ``config.yaml`` is read with ``yaml.safe_load`` (no tags, no interpolation resolvers), and
  nothing in it is instantiated by name (no hydra ``_target_``): :mod:`ccfm.state.model` maps
  the model name to arc-state's transition class itself.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = [
    "UnsafeFileError",
    "RunDirError",
    "RestrictedUnpickler",
    "safe_unpickle",
    "load_var_dims",
    "load_tensor_file",
    "load_yaml",
    "load_onehot_map",
    "TensorMapUnpickler",
    "CHECKPOINT_SAFE_GLOBALS",
]


class UnsafeFileError(pickle.UnpicklingError):
    """A pickle names something that is not plain data; it was not loaded."""


class RunDirError(FileNotFoundError):
    """A State run directory lacks a file, or a file has the wrong content."""


# Builtins that only build plain values. No getattr/eval/exec/__import__/type/object: a pickle
# can call whatever global it names with arguments of its choosing.
_SAFE_BUILTINS = frozenset(
    {
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
        "str",
        "bytes",
        "bytearray",
        "int",
        "float",
        "complex",
        "bool",
        "slice",
    }
)
# What numpy pickles an ndarray / numpy scalar / dtype with, across numpy 1.x and 2.x module names.
_NUMPY_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)
_SAFE_GLOBALS = frozenset(
    {("builtins", name) for name in _SAFE_BUILTINS} | {("collections", "OrderedDict")} | _NUMPY_GLOBALS
)

_ALLOWED_DESCRIPTION = (
    "plain containers (dict, list, tuple, set), strings, numbers, booleans, None and numpy arrays/scalars"
)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals of plain data (:data:`_SAFE_GLOBALS`).

    ``find_class`` is where a pickle turns a name into a callable; refusing there means a
    malicious ``__reduce__`` (``os.system``, ``subprocess.Popen``, ``builtins.eval``...) is
    never looked up, let alone called. Persistent ids (used for out-of-band objects) are refused
    too.
    """

    def __init__(self, file: io.BufferedIOBase, *, source: str = "<pickle>") -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeFileError(
            f"{self._source}: refused to load: it names {module}.{name}, which is not plain data. "
            f"Only {_ALLOWED_DESCRIPTION} are accepted; nothing from the file was executed."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeFileError(
            f"{self._source}: refused to load: it uses persistent ids ({pid!r}), which plain data never does"
        )


def _check_plain(value: Any, source: str, where: str = "value", depth: int = 0) -> None:
    """Walk an unpickled value; every part must be plain data (belt and braces after find_class)."""
    if depth > 100:
        raise UnsafeFileError(f"{source}: nested more than 100 levels deep at {where}")
    if value is None or isinstance(value, (str, bytes, bytearray, bool, int, float, complex, np.generic)):
        return
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            for i, item in enumerate(value.ravel()[:100000]):
                _check_plain(item, source, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, source, f"{where} key", depth + 1)
            _check_plain(item, source, f"{where}[{key!r}]", depth + 1)
        return
    if isinstance(value, (list, tuple, set, frozenset)):
        for i, item in enumerate(value):
            _check_plain(item, source, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, slice):
        return
    raise UnsafeFileError(f"{source}: {where} is a {type(value).__name__}; only {_ALLOWED_DESCRIPTION} are accepted")


def safe_unpickle(data: bytes, *, source: str = "<pickle>") -> Any:
    """Unpickle ``data`` admitting plain data only; raises :class:`UnsafeFileError` otherwise."""
    try:
        value = RestrictedUnpickler(io.BytesIO(data), source=source).load()
    except UnsafeFileError:
        raise
    except Exception as error:  # truncated or corrupt file: say which one
        raise UnsafeFileError(
            f"{source}: not a readable pickle of plain data ({type(error).__name__}: {error})"
        ) from error
    _check_plain(value, source)
    return value


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise RunDirError(f"{path.parent}: missing {path.name} ({what})")
    return path


def load_var_dims(path: str | Path) -> dict[str, Any]:
    """Read State's ``var_dims.pkl`` (dimensions and gene names) with the restricted unpickler.

    Gene names come back as a list of str whatever container they were pickled in.
    """
    path = _require(Path(path), "State's var_dims.pkl: gene names and input/output dimensions")
    value = safe_unpickle(path.read_bytes(), source=str(path))
    if not isinstance(value, dict):
        raise UnsafeFileError(f"{path}: expected a dict of dimensions, got {type(value).__name__}")
    missing = [key for key in ("input_dim", "output_dim", "pert_dim") if key not in value]
    if missing:
        raise RunDirError(f"{path}: has no {', '.join(missing)} (keys: {sorted(map(str, value))})")
    if "gene_names" in value and value["gene_names"] is not None:
        value = dict(value)
        value["gene_names"] = [str(g) for g in np.asarray(value["gene_names"]).ravel().tolist()]
    return value


# What a Lightning checkpoint of ``state tx train`` needs beyond torch's own weights-only set:
# its ``hyper_parameters`` hold numpy integers (var_dims' ``input_dim``/``output_dim``), pickled as
# numpy scalars with their dtype (found by loading such a checkpoint with weights_only=True and
# an empty list). numpy arrays are admitted too (plain data). Resolved by name; a module that
# numpy lacks (1.x vs 2.x names) is skipped.
CHECKPOINT_SAFE_GLOBALS: tuple[tuple[str, str], ...] = (
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
)


def _resolved_safe_globals() -> list[Any]:
    import importlib
    import warnings

    resolved = []
    for module_name, name in CHECKPOINT_SAFE_GLOBALS:
        try:
            with warnings.catch_warnings():  # numpy 2 warns on its numpy.core aliases
                warnings.simplefilter("ignore")
                module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, name):
            resolved.append(getattr(module, name))
    # numpy dtype classes (numpy.dtypes.Float64DType ...) are how numpy 2 pickles dtypes.
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        resolved += [
            getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and isinstance(getattr(dtypes, n), type)
        ]
    return resolved


def load_tensor_file(path: str | Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU with :data:`CHECKPOINT_SAFE_GLOBALS`.

    Raises :class:`RunDirError` naming the file when it is missing and :class:`UnsafeFileError`
    when it holds anything torch's restricted unpickler refuses.
    """
    import torch

    path = _require(Path(path), what)
    try:
        with torch.serialization.safe_globals(_resolved_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # torch's message opens with advice to load unsafely; the reason is on a later line.
        reason = next(
            (line for line in lines if "Unsupported global" in line or "can only build" in line.lower()),
            lines[-1] if lines else "",
        )
        raise UnsafeFileError(
            f"{path}: refused to load with torch.load(weights_only=True): {reason} "
            "(only tensors and plain data are accepted; nothing from the file was executed)"
        ) from error


def load_yaml(path: str | Path, what: str) -> dict[str, Any]:
    """``yaml.safe_load`` of a mapping; a missing file is a :class:`RunDirError` naming it."""
    path = _require(Path(path), what)
    with open(path) as handle:
        value = yaml.safe_load(handle)
    if not isinstance(value, dict):
        raise RunDirError(f"{path}: expected a YAML mapping, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------------
# One-hot maps written with plain pickle (batch_onehot_map.pkl, cell_type_onehot_map.pkl)
# --------------------------------------------------------------------------------------------


def _storage_from_bytes(data: bytes) -> Any:
    """What ``torch.storage._load_from_bytes`` does, but with ``weights_only=True``."""
    import torch

    if not isinstance(data, (bytes, bytearray)):
        raise UnsafeFileError(f"a pickled tensor storage must be bytes, got {type(data).__name__}")
    return torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)


class TensorMapUnpickler(RestrictedUnpickler):
    """:class:`RestrictedUnpickler` that also rebuilds CPU tensors pickled with plain ``pickle``."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            import torch._utils

            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        return super().find_class(module, name)


def load_onehot_map(path: str | Path, what: str) -> dict[str, Any]:
    """A one-hot map of a State run directory: name -> tensor (``.pt`` via :func:`load_tensor_file`,
    ``.pkl`` via :class:`TensorMapUnpickler`); anything but such a mapping is refused."""
    import torch

    path = _require(Path(path), what)
    if path.suffix == ".pt":
        value = load_tensor_file(path, what)
    else:
        try:
            value = TensorMapUnpickler(io.BytesIO(path.read_bytes()), source=str(path)).load()
        except UnsafeFileError:
            raise
        except Exception as error:
            raise UnsafeFileError(
                f"{path}: not a readable pickle of a one-hot map ({type(error).__name__}: {error})"
            ) from error
    if not isinstance(value, dict):
        raise UnsafeFileError(f"{path}: expected a mapping of names to one-hot vectors, got {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(item, torch.Tensor):
            _check_plain(item, str(path), f"[{key!r}]")
    return {str(key): item for key, item in value.items()}
