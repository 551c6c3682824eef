"""Import scGPT's ``TransformerModel`` without running ``scgpt/__init__.py``.

scgpt 0.2.4 (latest on PyPI) imports torchtext, IPython and ``datasets`` from its package
``__init__``; torchtext does not load on current torch. The model module itself
(``scgpt/model/model.py``) only needs torch and two sibling modules (``dsbn``, ``grad_reverse``).
We therefore register *empty* parent package modules ``scgpt`` and ``scgpt.model`` whose
``__path__`` points at the installed directories, so the normal import machinery can find and
execute ``scgpt.model.model`` (and its relative imports) while skipping both ``__init__`` files.
This is the only place in the project that knows about that workaround.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from pathlib import Path
from types import ModuleType

_PARENTS = ("scgpt", "scgpt.model")


class ScGPTImportError(ImportError):
    """The installed scgpt package cannot be located or its model module fails to load."""


def scgpt_package_dir() -> Path:
    """Directory of the installed ``scgpt`` package, found without importing it."""
    loaded = sys.modules.get("scgpt")
    if loaded is not None and getattr(loaded, "__path__", None):
        return Path(list(loaded.__path__)[0])
    spec = importlib.util.find_spec("scgpt")
    if spec is None or not spec.submodule_search_locations:
        raise ScGPTImportError(
            "the 'scgpt' package is not installed; install it with `pip install --no-deps scgpt==0.2.4`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def census_vocab_path() -> Path:
    """Path of the real gene vocabulary shipped in the scgpt wheel (gene symbol -> id)."""
    path = scgpt_package_dir() / "tokenizer" / "default_census_vocab.json"
    if not path.exists():
        raise ScGPTImportError(
            f"{path} is missing: the scgpt installation is incomplete; reinstall with "
            "`pip install --no-deps --force-reinstall scgpt==0.2.4`"
        )
    return path


def _register_bare_parents(package_dir: Path) -> None:
    """Put namespace-like ``scgpt`` / ``scgpt.model`` modules in ``sys.modules`` if absent."""
    directories = {"scgpt": package_dir, "scgpt.model": package_dir / "model"}
    for name in _PARENTS:
        existing = sys.modules.get(name)
        if existing is not None:
            continue  # a real (or our bare) package is already importable: reuse it
        module = types.ModuleType(name)
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(directories[name])]
        module.__spec__ = spec
        module.__path__ = [str(directories[name])]  # makes it a package for the import system
        module.__package__ = name
        sys.modules[name] = module


def load_scgpt_model_module() -> ModuleType:
    """Return the module ``scgpt.model.model`` (holds ``TransformerModel``), importing it once."""
    cached = sys.modules.get("scgpt.model.model")
    if cached is not None:
        return cached
    _register_bare_parents(scgpt_package_dir())
    with warnings.catch_warnings():
        # the module warns "flash_attn is not installed" at import: expected, we never use flash-attn
        warnings.filterwarnings("ignore", message="flash_attn is not installed")
        try:
            return importlib.import_module("scgpt.model.model")
        except Exception as error:  # pragma: no cover - depends on the installed scgpt version
            raise ScGPTImportError(
                f"could not import scgpt.model.model from {scgpt_package_dir()}: {error}. "
                "This workaround targets scgpt 0.2.4 installed with --no-deps."
            ) from error


def transformer_model_class() -> type:
    """The real ``scgpt.model.model.TransformerModel`` class."""
    return load_scgpt_model_module().TransformerModel
