"""Result writers: outputs get the usual umask permissions, and a failed write leaves no file behind.

Each writer goes through ``ccfm.io.atomic.atomic_output``. Under umask 022 an output must be 0644
(group-readable: results folders are shared on clusters). A write that fails midway is simulated
by making the serialiser write part of its file and then raise; the previous output must stay as
it was and no temporary file may remain.
"""

from __future__ import annotations

import functools
import stat
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from ccfm.evaluate.plots import plt, save_figure
from ccfm.io.atomic import write_binary_atomic, write_table_atomic, write_text_atomic
from ccfm.io.predictions import write_predictions
from ccfm.scgpt.vocab import map_genes, write_coverage_table, write_gene_vocab

GENES = ["A", "B", "C"]


def _figure(folder: Path) -> list[Path]:
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure(fig, folder / "figure.png")
    return [folder / "figure.png"]


def _table(folder: Path) -> list[Path]:
    write_table_atomic(pd.DataFrame({"x": [1.5, 2.5]}), folder / "table.tsv", sep="\t")
    return [folder / "table.tsv"]


def _predictions(folder: Path) -> list[Path]:
    predicted = {"A": np.full((2, 3), 0.5, dtype=np.float32)}
    controls = np.ones((4, 3), dtype=np.float32)
    write_predictions(folder / "pred.h5ad", folder / "pred_means.csv", GENES, predicted, controls)
    return [folder / "pred.h5ad", folder / "pred_means.csv"]


def _gene_vocab(folder: Path) -> list[Path]:
    write_gene_vocab(map_genes(GENES, {"A": 0, "c": 2}), folder / "gene_vocab.tsv")
    return [folder / "gene_vocab.tsv"]


def _coverage(folder: Path) -> list[Path]:
    write_coverage_table(map_genes(GENES, {"A": 0}), folder / "coverage.tsv", "demo")
    return [folder / "coverage.tsv"]


# writer -> (the method that serialises its first output, called as method(self, path, ...))
WRITERS: dict[str, tuple[Callable[[Path], list[Path]], tuple[type, str]]] = {
    "figure": (_figure, (Figure, "savefig")),
    "table": (_table, (pd.DataFrame, "to_csv")),
    "predictions": (_predictions, (ad.AnnData, "write_h5ad")),
    "gene_vocab": (_gene_vocab, (pd.DataFrame, "to_csv")),
    "coverage": (_coverage, (pd.DataFrame, "to_csv")),
}


def _write_part_then_fail(self: object, path: str | Path, *args: object, **kwargs: object) -> None:
    Path(path).write_bytes(b"half a file")
    raise OSError("simulated: disk full")


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_outputs_are_group_readable_under_umask_022(tmp_path: Path, writer: str, umask_022: None) -> None:
    write, _ = WRITERS[writer]
    for output in write(tmp_path):
        assert stat.S_IMODE(output.stat().st_mode) == 0o644, f"{output.name}: {oct(output.stat().st_mode)}"


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_failed_write_keeps_the_old_output_and_leaves_no_temporary_file(
    tmp_path: Path, writer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    write, (owner, serialiser) = WRITERS[writer]
    outputs = write(tmp_path)
    before = {path.name: path.read_bytes() for path in outputs}
    monkeypatch.setattr(owner, serialiser, _write_part_then_fail)
    with pytest.raises(OSError, match="simulated"):
        write(tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_temporaries_of_a_killed_writer_are_removed_before_the_output_is_written(tmp_path: Path) -> None:
    """SIGKILL skips atomic_output's cleanup: the next write of that output removes the leftovers."""
    from ccfm.io.atomic import atomic_output, stale_temporaries

    out = tmp_path / "processed.h5ad"
    # names atomic_output gives its temporaries, as a killed job (or two SLURM attempts) left them
    stale = [tmp_path / ".processed.h5ad.0123456789ab.tmp.h5ad", tmp_path / ".processed.h5ad.ba9876543210.tmp.h5ad"]
    # not temporaries of this output: another output's, a download's .part, a user's hidden file
    kept = [
        tmp_path / ".pred.h5ad.0123456789ab.tmp.h5ad",
        tmp_path / "processed.h5ad.part",
        tmp_path / ".processed.h5ad.notes",
    ]
    for path in stale + kept:
        path.write_bytes(b"x" * 10)
    assert stale_temporaries(out) == sorted(stale)
    with atomic_output(out) as tmp:
        tmp.write_bytes(b"complete")
    assert out.read_bytes() == b"complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, *(p.name for p in kept)])


# --- a full disk: named device and file, nothing left behind --------------------------------------

FULL = Path("/dev/full")  # every write to it fails with ENOSPC


@pytest.fixture()
def full_disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The next atomic_output in ``tmp_path`` writes its temporary file onto /dev/full."""
    if not FULL.exists():
        pytest.skip("/dev/full is not available")
    import ccfm.io.atomic as h5io

    class _FixedUUID:
        hex = "0123456789abcdef"

    monkeypatch.setattr(h5io.uuid, "uuid4", lambda: _FixedUUID())
    original = h5io.stale_temporaries

    def plant_full_disk(path):  # after the stale clean-up, so the link stays
        result = original(path)
        target = Path(path).parent / f".{Path(path).name}.0123456789ab.tmp{Path(path).suffix}"
        target.unlink(missing_ok=True)
        target.symlink_to(FULL)
        return [p for p in result if p != target]

    monkeypatch.setattr(h5io, "stale_temporaries", plant_full_disk)
    return tmp_path


def _assert_disk_full_message(error: BaseException, path: Path) -> None:
    message = str(error)
    assert message.startswith("no space left on "), message
    assert f"while writing {path}" in message
    assert "mounted at" in message  # the device is named with its mount point


def test_checkpoint_on_a_full_disk_names_device_and_file(full_disk: Path) -> None:
    import torch

    from ccfm.io.atomic import OutputWriteError

    out = full_disk / "resume" / "checkpoint.pt"
    with pytest.raises(OutputWriteError) as info:
        write_binary_atomic(out, functools.partial(torch.save, {"weights": torch.zeros(50_000)}))
    _assert_disk_full_message(info.value, out)
    assert info.value.errno == 28
    assert not out.exists() and list(out.parent.iterdir()) == []  # nothing half-written, link removed


def test_h5ad_and_table_on_a_full_disk_name_device_and_file(full_disk: Path) -> None:
    from ccfm.io.atomic import OutputWriteError

    out = full_disk / "pred.h5ad"
    predicted = {"A": np.ones((2, 3), dtype=np.float32)}
    with pytest.raises(OutputWriteError) as info:
        write_predictions(out, full_disk / "pred_means.csv", GENES, predicted, np.ones((2, 3)))
    _assert_disk_full_message(info.value, out)
    assert sorted(p.name for p in full_disk.iterdir()) == []


def test_other_errors_are_not_taken_for_a_full_disk(tmp_path: Path) -> None:
    from ccfm.io.atomic import atomic_output

    with pytest.raises(FileNotFoundError):
        with atomic_output(tmp_path / "x.tsv"):
            open(tmp_path / "missing-input.tsv").close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["text", "binary"])
def test_text_and_binary_writers_replace_the_output_only_on_success(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "out.json"
    if kind == "text":
        assert write_text_atomic(out, '{"a": 1}') == out
    else:
        assert write_binary_atomic(out, lambda handle: handle.write(b'{"a": 1}')) == out
    assert out.read_text() == '{"a": 1}'

    def fail(handle) -> None:
        handle.write(b"half a file")
        raise OSError("simulated: disk full")

    with pytest.raises(OSError, match="simulated"):
        write_binary_atomic(out, fail)
    assert out.read_text() == '{"a": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
