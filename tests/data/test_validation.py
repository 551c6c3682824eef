"""Bad inputs fail early with a dedicated error naming file, problem and fix; nothing is written.

Every case builds a small h5ad in ``tmp_path``, runs the package entry point of the first rule
that reads it (``preprocess_dataset`` / ``preprocess_target``) with its output in ``tmp_path``,
and asserts the exception type, the message content and that the output location holds no
file afterwards (not even a temporary one). scGPT checkpoint faults are checked against
``ccfm.scgpt.checkpoint.load_scgpt``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from ccfm.data.preprocess import PreprocessSettings, ScaleError, TargetSettings, preprocess_dataset, preprocess_target
from ccfm.data.splits import make_split
from ccfm.data.validation import (
    ControlLabelMismatchError,
    DuplicateGenesError,
    EnsemblIdsError,
    InputValidationError,
    InvalidValuesError,
    MissingColumnError,
    MissingLabelError,
    NoControlCellsError,
    UnknownPerturbationError,
    UnreadableInputError,
    check_chunk_values,
    doubles_missing_singles,
    near_control_labels,
    validate_predict_entries,
)
from scgpt_test_data import SMALL_SCGPT_SIZES, copy_checkpoint

N_CELLS, N_GENES = 120, 30
GENES = [f"G{i}" for i in range(N_GENES)]


def _labels(rng: np.random.Generator, control: str = "non-targeting") -> np.ndarray:
    return rng.choice([control, "G1", "G2", "G1+G2"], size=N_CELLS)


def _write(path: Path, *, x: Any = None, obs: pd.DataFrame | None = None, var: pd.DataFrame | None = None) -> Path:
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.0, size=(N_CELLS, N_GENES)).astype(np.float32) if x is None else x
    obs = pd.DataFrame({"target_gene": _labels(rng)}) if obs is None else obs
    obs.index = [f"c{i}" for i in range(N_CELLS)]
    var = pd.DataFrame(index=GENES) if var is None else var
    ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var).write_h5ad(path)
    return path


def _counts() -> np.ndarray:
    return np.random.default_rng(0).poisson(1.0, size=(N_CELLS, N_GENES)).astype(np.float32)


def _bad_value(value: float, row: int) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        x = _counts()
        x[row, 3] = value
        return _write(path, x=x)

    return make


def _log1p_data(path: Path) -> Path:
    x = _counts()
    x = np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)
    return _write(path, x=x)


def _obs(labels: list[str] | np.ndarray, column: str = "target_gene") -> pd.DataFrame:
    return pd.DataFrame({column: labels})


def _unlabelled(path: Path) -> Path:
    labels = _labels(np.random.default_rng(0)).astype(object)
    labels[5] = None
    return _write(path, obs=_obs(labels))


def _ensembl(with_symbols: bool) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        var = pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(N_GENES)])
        if with_symbols:
            var["gene_symbols"] = GENES
        return _write(path, var=var)

    return make


def _truncated(path: Path) -> Path:
    _write(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


# (builder, preprocess kwargs, exception, message fragments)
BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], dict[str, Any], type[Exception], list[str]]] = {
    "missing_perturbation_column": (
        lambda p: _write(p, obs=_obs(_labels(np.random.default_rng(0)), column="guide_identity")),
        {},
        MissingColumnError,
        ["'target_gene'", "guide_identity", "perturbation_column", "config/config.yaml"],
    ),
    "unlabelled_cells": (_unlabelled, {}, MissingLabelError, ["1 cells have no label", "c5"]),
    "no_control_cells": (
        lambda p: _write(p, obs=_obs(np.random.default_rng(0).choice(["G1", "G2", "G1+G2"], N_CELLS))),
        {},
        NoControlCellsError,
        ["no control cells", "'non-targeting'", "control_label"],
    ),
    "control_label_near_match": (
        lambda p: _write(p, obs=_obs(_labels(np.random.default_rng(0), control="NonTargeting_sgRNA"))),
        {},
        ControlLabelMismatchError,
        ["similar labels exist", "control_label: NonTargeting_sgRNA"],
    ),
    "control_label_misconfigured": (
        lambda p: _write(p, obs=_obs(_labels(np.random.default_rng(0), control="NTC"))),
        {"control_label": "NTC_ctrl"},
        ControlLabelMismatchError,
        ["'NTC_ctrl'", "control_label: NTC"],
    ),
    "negative_values": (_bad_value(-2.0, 100), {}, InvalidValuesError, ["negative values", "raw counts"]),
    "nan_values": (_bad_value(np.nan, 117), {}, InvalidValuesError, ["NaN/infinite", "117", "finite"]),
    "inf_values": (_bad_value(np.inf, 60), {}, InvalidValuesError, ["NaN/infinite", "row 60"]),
    "log1p_where_counts_expected": (
        _log1p_data,
        {"input_scale": "counts"},
        ScaleError,
        [
            "input_scale: counts",
            "look like log1p",
            "normalised and log-transformed a second time",
            "input_scale: log1p",
        ],
    ),
    "counts_where_log1p_expected": (
        lambda p: _write(p),
        {"input_scale": "log1p"},
        ScaleError,
        ["input_scale: log1p", "look like counts", "raw counts", "input_scale: counts"],
    ),
    "duplicated_gene_names": (
        lambda p: _write(p, var=pd.DataFrame(index=GENES[:-2] + ["G1", "G7"])),
        {},
        DuplicateGenesError,
        ["2 gene names occur more than once", "G1 x2", "G7 x2", "var_names_make_unique"],
    ),
    "ensembl_ids_with_symbol_column": (
        _ensembl(True),
        {},
        EnsemblIdsError,
        ["Ensembl ids", "ENSG00000000000", "var['gene_symbols']"],
    ),
    "ensembl_ids_without_symbols": (_ensembl(False), {}, EnsemblIdsError, ["Ensembl ids", "HGNC symbols"]),
    "predict_gene_not_in_data": (
        lambda p: _write(p),
        {"predict": ["G3+g4", "NOTAGENE"]},
        UnknownPerturbationError,
        ["'g4' is not in the data", "did you mean 'G4'", "'NOTAGENE'", "predict:"],
    ),
    "truncated_h5ad": (
        _truncated,
        {},
        UnreadableInputError,
        ["truncated file", "truncated or corrupted", "download/export it again"],
    ),
    "not_an_h5ad": (lambda p: (p.write_text("gene,cell\n"), p)[1], {}, UnreadableInputError, ["not an HDF5/h5ad file"]),
    "empty_file": (lambda p: (p.write_bytes(b""), p)[1], {}, UnreadableInputError, ["the file is empty"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_and_writes_nothing(tmp_path: Path, case: str) -> None:
    build, kwargs, error, fragments = BAD_INPUTS[case]
    raw = build(tmp_path / "raw.h5ad")
    out_dir = tmp_path / "results" / "ds"
    out = out_dir / "processed.h5ad"
    with pytest.raises(error) as caught:
        preprocess_dataset(raw, out, PreprocessSettings(dataset="ds", n_top_genes=10, chunk_size=32, **kwargs))
    assert isinstance(caught.value, InputValidationError)
    message = str(caught.value)
    assert str(raw) in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert not out.exists()
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_nan_found_by_streaming_check_names_row_and_nothing_left(tmp_path: Path) -> None:
    """NaN is reported with its row by the chunk-by-chunk check (chunk 3 of 8 here)."""
    x = _counts()
    x[45, 7] = np.nan
    raw = _write(tmp_path / "raw.h5ad", x=x)
    out = tmp_path / "out" / "processed.h5ad"
    with pytest.raises(InvalidValuesError, match=r"1 NaN/infinite values in rows 45\.\.45"):
        preprocess_dataset(raw, out, PreprocessSettings(dataset="ds", n_top_genes=10, chunk_size=16))
    assert not out.exists() and (not out.parent.exists() or list(out.parent.iterdir()) == [])


def test_target_with_ensembl_ids_and_bad_predict(tmp_path: Path) -> None:
    raw = _write(tmp_path / "raw.h5ad")
    processed = tmp_path / "processed.h5ad"
    preprocess_dataset(raw, processed, PreprocessSettings(dataset="ds", n_top_genes=10, chunk_size=32))
    target = _ensembl(True)(tmp_path / "target_raw.h5ad")
    out = tmp_path / "out" / "target_processed.h5ad"
    with pytest.raises(EnsemblIdsError, match="target_raw.h5ad"):
        preprocess_target(target, processed, out, TargetSettings(dataset="ds", chunk_size=32))
    assert not out.exists()
    good_target = _write(tmp_path / "target_ok.h5ad")
    with pytest.raises(UnknownPerturbationError, match="'ZZZ' is not in the data"):
        preprocess_target(good_target, processed, out, TargetSettings(dataset="ds", chunk_size=32, predict=["ZZZ"]))
    assert not out.exists()
    # duplicated target genes are tolerated (first occurrence used), with a warning
    dup_target = _write(tmp_path / "target_dup.h5ad", var=pd.DataFrame(index=GENES[:-1] + ["G1"]))
    summary = preprocess_target(dup_target, processed, out, TargetSettings(dataset="ds", chunk_size=32))
    assert out.exists() and summary["n_cells"] == N_CELLS


def test_target_without_controls_fails(tmp_path: Path) -> None:
    raw = _write(tmp_path / "raw.h5ad")
    processed = tmp_path / "processed.h5ad"
    preprocess_dataset(raw, processed, PreprocessSettings(dataset="ds", n_top_genes=10, chunk_size=32))
    target = _write(tmp_path / "t.h5ad", obs=_obs(_labels(np.random.default_rng(1), control="ctrl-guide")))
    out = tmp_path / "out" / "target_processed.h5ad"
    with pytest.raises(ControlLabelMismatchError, match="control_label: ctrl-guide"):
        preprocess_target(target, processed, out, TargetSettings(dataset="ds", chunk_size=32))
    assert not out.exists()


def test_predict_genes_are_kept_in_processed(tmp_path: Path) -> None:
    raw = _write(tmp_path / "raw.h5ad")
    out = tmp_path / "processed.h5ad"
    summary = preprocess_dataset(
        raw, out, PreprocessSettings(dataset="ds", n_top_genes=3, chunk_size=32, predict=["G20+G25", "G29"])
    )
    genes = set(ad.read_h5ad(out, backed="r").var_names)
    assert {"G20", "G25", "G29", "G1", "G2"} <= genes
    assert summary["n_genes"] == len(genes)


def test_doubles_missing_singles_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    labels = np.random.default_rng(0).choice(["non-targeting", "G1", "G1+G2", "G1+G3"], size=N_CELLS)
    raw = _write(tmp_path / "raw.h5ad", obs=_obs(labels))
    with caplog.at_level(logging.WARNING):
        preprocess_dataset(raw, tmp_path / "p.h5ad", PreprocessSettings(dataset="ds", n_top_genes=10, chunk_size=32))
    assert "2 double perturbation(s) lack cells" in caplog.text
    assert "additive baseline" in caplog.text and "G1+G2, G1+G3" in caplog.text
    split = make_split(labels, fold=1, seed=0, heldout_fraction=0.5)
    assert split["doubles_missing_singles"] == ["G1+G2", "G1+G3"]
    assert doubles_missing_singles(["non-targeting", "A", "B", "A+B", "A+C"]) == ["A+C"]


# ---------------------------------------------------------------- unit checks


def test_validate_predict_entries_with_vocab() -> None:
    genes = ["A", "B", "C"]
    assert validate_predict_entries(["A+B", "C", "ctrl+A"], genes, vocab={"A": 0, "B": 1, "C": 2}) == ["A", "B", "C"]
    with pytest.raises(UnknownPerturbationError, match="'C' is not in the scGPT vocabulary"):
        validate_predict_entries(["A+C"], genes, vocab=["A", "B"])
    with pytest.raises(UnknownPerturbationError, match="names 3 genes"):
        validate_predict_entries(["A+B+C"], genes)
    assert validate_predict_entries([], genes) == []


def test_near_control_labels() -> None:
    assert near_control_labels(["G1", "Control_1", "G2"], "non-targeting") == ["Control_1"]
    assert near_control_labels(["G1", "G2"], "non-targeting") == []
    assert near_control_labels(["G1", "non-targetting", "Non-Targeting-sg"], "non-targeting") == [
        "non-targetting",
        "Non-Targeting-sg",
    ]


def test_check_chunk_values_names_rows() -> None:
    chunk = sp.csr_matrix(np.array([[0, 1], [0, 0], [-1, 0]], dtype=np.float32))
    with pytest.raises(InvalidValuesError, match=r"rows 12\.\.12"):
        check_chunk_values(chunk, Path("x.h5ad"), 10)
    check_chunk_values(sp.csr_matrix((3, 2), dtype=np.float32), Path("x.h5ad"), 0)


# ---------------------------------------------------------------- scGPT checkpoint faults


@pytest.fixture(scope="module")
def tiny_scgpt(tiny_scgpt_checkpoint) -> Path:
    return tiny_scgpt_checkpoint(seed=0, **SMALL_SCGPT_SIZES)


def _drop(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def _edit_args(**changes: Any) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        args = json.loads((d / "args.json").read_text())
        args.update(changes)
        (d / "args.json").write_text(json.dumps(args))

    return edit


def _truncate(d: Path) -> None:
    data = (d / "best_model.pt").read_bytes()
    (d / "best_model.pt").write_bytes(data[: len(data) // 2])


def _corrupt(d: Path) -> None:
    data = bytearray((d / "best_model.pt").read_bytes())
    data[:64] = b"\x00" * 64
    (d / "best_model.pt").write_bytes(bytes(data))


CHECKPOINT_FAULTS: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "missing_weights": (_drop("best_model.pt"), ["lacks best_model.pt"]),
    "missing_vocab": (_drop("vocab.json"), ["lacks vocab.json"]),
    "missing_args": (_drop("args.json"), ["lacks args.json"]),
    "args_wrong_nlayers": (_edit_args(nlayers=3), ["nlayers=3", "do not belong together"]),
    "args_wrong_embsize": (_edit_args(embsize=32), ["embsize=32"]),
    "args_not_json": (lambda d: (d / "args.json").write_text("{not json"), ["not valid JSON"]),
    "args_missing_key": (lambda d: (d / "args.json").write_text(json.dumps({"embsize": 16})), ["lacks required key"]),
    "truncated_checkpoint": (_truncate, ["best_model.pt", "re-download"]),
    "corrupted_checkpoint": (_corrupt, ["best_model.pt", "re-download"]),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_FAULTS))
def test_scgpt_checkpoint_faults(tiny_scgpt: Path, tmp_path: Path, case: str) -> None:
    from ccfm.scgpt.checkpoint import CheckpointError, load_scgpt

    fault, fragments = CHECKPOINT_FAULTS[case]
    model_dir = copy_checkpoint(tiny_scgpt, tmp_path / "ckpt")
    fault(model_dir)
    with pytest.raises(CheckpointError) as caught:
        load_scgpt(model_dir)
    message = str(caught.value)
    assert str(model_dir) in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"


def test_scgpt_intact_checkpoint_loads(tiny_scgpt: Path) -> None:
    from ccfm.scgpt.checkpoint import load_scgpt

    model, vocab, args = load_scgpt(tiny_scgpt)
    assert args["nlayers"] == 1 and "<cls>" in vocab and not any(p.requires_grad for p in model.parameters())
