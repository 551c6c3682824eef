"""Faults: a killed or dropped download resumes; an interrupted write leaves no output file.

The download tests run a local ``http.server`` on 127.0.0.1 (no internet on CI). The write tests
interrupt every writer of the data stage (preprocess, preprocess_target, split JSON, real.h5ad)
by an exception mid-write and by SIGKILL of a child process mid-write, and check that the
output path does not exist afterwards, so Snakemake (which trusts an existing output) never
accepts a half-written file.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from ccfm.data.download import ChecksumError, DownloadError, download_file
from ccfm.data.preprocess import PreprocessSettings, TargetSettings, preprocess_dataset, preprocess_target
from ccfm.data.splits import make_split, write_real, write_split
from ccfm.io import h5ad as h5io

PAYLOAD = np.random.default_rng(3).integers(0, 256, size=3 * (1 << 20) + 12345, dtype=np.uint8).tobytes()
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD with Range support. Modes: drop the first response mid-body, or trickle."""

    mode = "drop"
    requests: list[str | None] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        rng = self.headers.get("Range")
        first = not type(self).requests
        type(self).requests.append(rng)
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        body = PAYLOAD[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if first and self.mode == "drop":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.connection.shutdown(2)  # connection lost mid-body
                return
            step = 1 << 18
            for offset in range(0, len(body), step):
                self.wfile.write(body[offset : offset + step])
                if first and self.mode == "trickle":
                    time.sleep(0.15)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture()
def server() -> Iterator[tuple[str, type[_FlakyHandler]]]:
    handler = type("Handler", (_FlakyHandler,), {"requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/data.bin", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_dropped_download_resumes_with_range_and_verifies(server, tmp_path: Path) -> None:
    url, handler = server
    dest = tmp_path / "raw.h5ad"
    part = tmp_path / "raw.h5ad.part"
    with pytest.raises(DownloadError, match=r"connection closed after \d+ of 3158073 bytes.*partial file is kept"):
        download_file(url, dest, sha256=SHA256, progress=False, allow_http=True)
    assert not dest.exists()
    kept = part.stat().st_size
    assert 0 < kept < len(PAYLOAD)
    download_file(url, dest, sha256=SHA256, progress=False, allow_http=True)
    assert handler.requests == [None, f"bytes={kept}-"]
    assert dest.read_bytes() == PAYLOAD and not part.exists()


@pytest.mark.slow  # subprocess
def test_killed_download_process_resumes(server, tmp_path: Path) -> None:
    url, handler = server
    handler.mode = "trickle"
    dest = tmp_path / "raw.h5ad"
    part = tmp_path / "raw.h5ad.part"
    code = (
        "import sys; from pathlib import Path; from ccfm.data.download import download_file; "
        "download_file(sys.argv[1], Path(sys.argv[2]), sha256=sys.argv[3], progress=False, allow_http=True)"
    )
    child = subprocess.Popen([sys.executable, "-c", code, url, str(dest), SHA256])
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size >= (1 << 20)):
        assert child.poll() is None and time.monotonic() < deadline, "child finished/stalled before the kill"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    assert not dest.exists()
    kept = part.stat().st_size
    assert 0 < kept < len(PAYLOAD)
    download_file(url, dest, sha256=SHA256, progress=False, allow_http=True)
    assert handler.requests[-1] == f"bytes={kept}-"
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == SHA256


def test_resumed_bytes_that_do_not_match_are_rejected(server, tmp_path: Path) -> None:
    url, handler = server
    handler.mode = "normal"
    dest = tmp_path / "raw.h5ad"
    part = tmp_path / "raw.h5ad.part"
    part.write_bytes(b"\xff" * 1000)  # a stale/foreign partial file
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        download_file(url, dest, sha256=SHA256, progress=False, allow_http=True)
    assert not dest.exists() and not part.exists()
    download_file(url, dest, sha256=SHA256, progress=False, allow_http=True)  # the rerun starts over and succeeds
    assert dest.read_bytes() == PAYLOAD


# ---------------------------------------------------------------- interrupted writes


def _raw(path: Path, n_cells: int = 600, n_genes: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x = sp.csr_matrix(rng.poisson(0.8, size=(n_cells, n_genes)).astype(np.float32))
    obs = pd.DataFrame(
        {"target_gene": rng.choice(["non-targeting", "G1", "G2", "G3", "G1+G2", "G1+G3"], n_cells)},
        index=[f"c{i}" for i in range(n_cells)],
    )
    ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)])).write_h5ad(path)
    return path


def _fail_on_second_append(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Make the second ``CSRH5adWriter.append`` raise; reset the returned counter to re-arm."""
    original = h5io.CSRH5adWriter.append
    calls = {"n": 0}

    def append(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("simulated: disk full")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(h5io.CSRH5adWriter, "append", append)
    return calls


def _assert_nothing_at(out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir()] if out.parent.exists() else []
    assert leftovers == [], f"temporary files left beside {out}: {leftovers}"


@pytest.fixture()
def processed(tmp_path: Path) -> Path:
    out = tmp_path / "processed.h5ad"
    preprocess_dataset(
        _raw(tmp_path / "raw.h5ad"), out, PreprocessSettings(dataset="ds", n_top_genes=10, chunk_size=100)
    )
    return out


def test_exception_mid_preprocess_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _raw(tmp_path / "raw.h5ad")
    out = tmp_path / "results" / "processed.h5ad"
    _fail_on_second_append(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        preprocess_dataset(raw, out, PreprocessSettings(dataset="ds", n_top_genes=10, chunk_size=100))
    _assert_nothing_at(out)


def test_exception_mid_target_and_real_leaves_no_output(
    processed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = _raw(tmp_path / "target.h5ad", seed=1)
    split = make_split(read_labels(processed), fold=1, seed=0, heldout_fraction=0.5)
    calls = _fail_on_second_append(monkeypatch)
    out = tmp_path / "t" / "target_processed.h5ad"
    with pytest.raises(OSError, match="disk full"):
        preprocess_target(target, processed, out, TargetSettings(dataset="ds", chunk_size=100))
    _assert_nothing_at(out)
    real = tmp_path / "fold1" / "real.h5ad"
    calls["n"] = 0
    with pytest.raises(OSError, match="disk full"):
        write_real(processed, split, real, chunk_size=100)
    _assert_nothing_at(real)


def read_labels(processed: Path) -> list[str]:
    return h5io.read_obs(processed)["target_gene"].astype(str).tolist()


def test_failed_split_json_write_leaves_no_file_and_keeps_old(tmp_path: Path) -> None:
    path = tmp_path / "splits" / "fold1.json"
    split = make_split(["non-targeting", "A", "B", "A+B", "C", "A+C"], fold=1, seed=0, heldout_fraction=0.5)
    with pytest.raises(TypeError):
        write_split({**split, "bad": object()}, path)
    _assert_nothing_at(path)
    write_split(split, path)
    with pytest.raises(TypeError):
        write_split({**split, "bad": object()}, path)
    assert json.loads(path.read_text()) == split  # the previous complete file is untouched
    assert [p.name for p in path.parent.iterdir()] == ["fold1.json"]


@pytest.mark.slow  # subprocess
def test_sigkill_mid_preprocess_leaves_no_output(tmp_path: Path) -> None:
    """A job killed by the scheduler mid-write (SIGKILL: no cleanup runs) leaves no output file."""
    raw = _raw(tmp_path / "raw.h5ad", n_cells=2000)
    out = tmp_path / "results" / "processed.h5ad"
    code = (
        "import sys, time; from ccfm.io import h5ad as h5io\n"
        "from ccfm.data.preprocess import PreprocessSettings, preprocess_dataset\n"
        "append = h5io.CSRH5adWriter.append\n"
        "def slow(self, *a, **k):\n"
        "    append(self, *a, **k); self._file.flush(); time.sleep(0.3)\n"
        "h5io.CSRH5adWriter.append = slow\n"
        "settings = PreprocessSettings(dataset='ds', n_top_genes=10, chunk_size=100)\n"
        "preprocess_dataset(sys.argv[1], sys.argv[2], settings)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(raw), str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not (out.parent.exists() and any(out.parent.iterdir())):
        assert child.poll() is None and time.monotonic() < deadline, "child finished before it could be killed"
        time.sleep(0.05)
    time.sleep(0.5)  # a few chunks written
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    assert not out.exists()
    leftovers = list(out.parent.iterdir())
    assert leftovers and all(p.name.startswith(".processed.h5ad.") and p.name.endswith(".tmp.h5ad") for p in leftovers)
    # a rerun writes the complete file; the stale hidden temporary never becomes the output
    preprocess_dataset(raw, out, PreprocessSettings(dataset="ds", n_top_genes=10, chunk_size=500))
    assert ad.read_h5ad(out).n_obs == 2000


def test_dropped_download_without_checksum_is_not_accepted(server, tmp_path: Path) -> None:
    """Without a checksum, a truncated transfer must still not be renamed into place."""
    url, _ = server
    dest = tmp_path / "raw.h5ad"
    with pytest.raises(DownloadError, match="connection closed"):
        download_file(url, dest, progress=False, allow_http=True)
    assert not dest.exists()
    download_file(url, dest, progress=False, allow_http=True)
    assert dest.read_bytes() == PAYLOAD


# ---------------------------------------------------------------- bounded memory helper


def test_backed_matrix_reads_rows_of_x_only(processed: Path) -> None:
    """h5io.backed_matrix gives X row access without loading layers (anndata backed mode would)."""
    rows = np.array([3, 17, 250, 599])
    expected = sp.vstack([c for _, c in h5io.iter_row_chunks(processed, 100, rows=rows)]).toarray()
    with h5io.backed_matrix(processed) as matrix:
        got = matrix[rows]
        assert not isinstance(matrix, sp.spmatrix)  # on disk, not a loaded matrix
    np.testing.assert_allclose(sp.csr_matrix(got).toarray(), expected)
    with h5io.backed_matrix(processed, layer="counts") as counts:
        assert counts.shape == (600, h5io.matrix_shape(processed)[1])
    assert isinstance(ad.read_h5ad(processed, backed="r").layers["counts"], sp.spmatrix)  # why it exists
