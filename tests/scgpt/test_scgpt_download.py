"""Whole-human checkpoint fetching: HTTP mirror against a local server, checksums, offline message."""

from __future__ import annotations

import hashlib
import http.server
import sys
import threading
from pathlib import Path

import pytest

from ccfm.data.download import ChecksumError
from ccfm.scgpt.checkpoint import (
    CHECKPOINT_FILES,
    CheckpointError,
    download_whole_human,
    load_scgpt,
    verify_checkpoint_files,
)
from scgpt_test_data import copy_checkpoint


@pytest.fixture(scope="module")
def served(tiny_scgpt_checkpoint):
    """A local HTTP server whose root holds a (tiny) checkpoint; records requested paths."""
    root = tiny_scgpt_checkpoint(seed=4)
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            requests.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root, requests
    httpd.shutdown()
    httpd.server_close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_mirror_download_verifies_and_loads(tmp_path, served):
    url, root, requests = served
    requests.clear()
    digests = {name: _sha(root / name) for name in CHECKPOINT_FILES}
    out = download_whole_human(
        tmp_path / "whole-human", "unused", mirror_url=url, sha256=digests, min_sizes={}, allow_http=True
    )
    assert all((out / name).read_bytes() == (root / name).read_bytes() for name in CHECKPOINT_FILES)
    assert sorted(requests) == sorted(f"/{name}" for name in CHECKPOINT_FILES)
    model, vocab, args = load_scgpt(out)
    assert args["embsize"] == 32
    requests.clear()
    download_whole_human(out, "unused", mirror_url=url, sha256=digests, min_sizes={}, allow_http=True)
    assert requests == []  # present and verified: nothing fetched again


def test_checksum_failure_is_reported_and_nothing_is_left(tmp_path, served):
    url, root, _ = served
    out = tmp_path / "whole-human"
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        download_whole_human(
            out, "unused", mirror_url=url, sha256={"args.json": "0" * 64}, min_sizes={}, allow_http=True
        )
    assert not (out / "args.json").exists() and not (out / "args.json.part").exists()


def test_size_check_catches_truncated_files(tmp_path, served):
    _, root, _ = served
    copy_checkpoint(root, tmp_path)
    with pytest.raises(CheckpointError, match="incomplete download"):
        verify_checkpoint_files(tmp_path, {"best_model.pt": 10**9})


def test_without_gdown_fails_fast_saying_where_to_put_the_files(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gdown", None)  # import gdown -> ImportError
    with pytest.raises(RuntimeError, match="by hand") as error:
        download_whole_human(tmp_path / "whole-human", "1oWh_-ZRdhtoGQ2Fw24HP41FgLoomVo-y")
    message = str(error.value)
    assert str(tmp_path / "whole-human") in message and "best_model.pt, vocab.json and args.json" in message
    assert "1oWh_-ZRdhtoGQ2Fw24HP41FgLoomVo-y" in message


class _FakeGdown:
    """Stands in for gdown: copies a local 'Drive folder' (nested, as gdown writes it) or fails."""

    def __init__(self, source: Path | None) -> None:
        self.source, self.calls = source, []

    def download_folder(self, id: str, output: str, quiet: bool, resume: bool = False) -> None:  # noqa: A002
        self.calls.append((id, resume))
        if self.source is None:
            raise ConnectionError("Failed to retrieve folder contents (offline)")
        copy_checkpoint(self.source, Path(output) / "scGPT_human")


def test_drive_folder_download_assembles_and_verifies(tmp_path, served, monkeypatch):
    _, root, _ = served
    fake = _FakeGdown(root)
    monkeypatch.setitem(sys.modules, "gdown", fake)
    out = download_whole_human(tmp_path / "whole-human", "folder123", min_sizes={})
    assert fake.calls == [("folder123", True)]
    assert sorted(p.name for p in out.iterdir()) == sorted(CHECKPOINT_FILES)  # staging removed
    assert load_scgpt(out)[2]["nlayers"] == 2


def test_offline_drive_download_fails_fast_and_keeps_partial_files(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gdown", _FakeGdown(None))
    with pytest.raises(RuntimeError, match="put best_model.pt, vocab.json and args.json into"):
        download_whole_human(tmp_path / "whole-human", "folder123")
    assert (tmp_path / "whole-human" / ".gdrive-download").is_dir()


def test_without_gdown_the_message_gives_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gdown", None)
    with pytest.raises(RuntimeError) as error:
        download_whole_human(tmp_path / "whole-human", "folder123")
    assert "pip install 'ccfm[download]'" in str(error.value) and "gdown>=5" in str(error.value)
    # the extra it names is declared
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert any(req.startswith("gdown") for req in pyproject["project"]["optional-dependencies"]["download"])
