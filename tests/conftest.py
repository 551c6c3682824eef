"""Shared fixtures: the real datasets in ../shared (skipped with a reason where absent), tiny scGPT checkpoints."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_REAL = REPO_ROOT.parent / "shared" / "data" / "real"

# Two cores are shared by everything on a CI machine: keep torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def _shared_file(name: str) -> Path:
    path = SHARED_REAL / name
    if not path.exists():
        pytest.skip(f"real test data {path} is absent (it ships in ../shared beside a development clone)")
    return path


@pytest.fixture(scope="session")
def datlinger_h5ad() -> Path:
    """CROP-seq Jurkat, 7,500 cells x 2,000 genes, raw counts, obs['perturbation'], control 'control'."""
    return _shared_file("datlinger2017_jurkat_cropseq_7500x2000.h5ad")


@pytest.fixture(scope="session")
def papalexi_h5ad() -> Path:
    """ECCITE-seq THP-1, 20,729 cells x 299 genes, raw counts, obs['target'], control 'non-targeting'."""
    return _shared_file("papalexi2021_thp1_lowmoi_20729x299.h5ad")


@pytest.fixture(scope="session")
def scgpt_pretraining_args() -> Path:
    """args.json of scGPT's whole-human pretraining run."""
    return _shared_file("scgpt_human_pretraining_args.json")


@pytest.fixture()
def umask_022() -> Iterator[None]:
    """The usual umask of a shared cluster account (group and others may read), restored afterwards."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.fixture(scope="session")
def tiny_scgpt_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``build(seed, **sizes)``: a tiny random scGPT checkpoint directory named ``tiny``.

    Each (seed, sizes) is built once per session; tests must not modify it (copy it first with
    ``scgpt_test_data.copy_checkpoint``).
    """
    from ccfm.scgpt.checkpoint import build_tiny_checkpoint

    built: dict[tuple, Path] = {}

    def build(seed: int, **sizes: int) -> Path:
        key = (seed, tuple(sorted(sizes.items())))
        if key not in built:
            built[key] = build_tiny_checkpoint(tmp_path_factory.mktemp("scgpt") / "tiny", seed=seed, **sizes)
        return built[key]

    return build


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip, saying why, where no CUDA device is visible."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
