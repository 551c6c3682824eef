"""ccfm.data.download against a local HTTP server (no internet on CI)."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest

from ccfm.data.download import (
    ChecksumError,
    DownloadError,
    UnsafeURLError,
    check_redirect,
    download_dataset,
    download_file,
)

PAYLOAD = bytes((i * 7 + 3) % 251 for i in range(300_000))
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /data.bin with optional Range support; records each request."""

    honour_range = True
    requests: list[dict] = []

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        if self.path != "/data.bin":
            self.send_error(404, "not found")
            return
        range_header = self.headers.get("Range")
        start = 0
        if range_header and self.honour_range:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
        body = PAYLOAD[start:]
        type(self).requests.append({"range": range_header, "sent": len(body)})
        if start and self.honour_range:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def server():
    _Handler.requests = []
    _Handler.honour_range = True
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler
    httpd.shutdown()
    httpd.server_close()


def test_full_download_verifies_and_renames(server, tmp_path: Path) -> None:
    base, handler = server
    dest = tmp_path / "sub" / "raw.h5ad"
    out = download_file(
        f"{base}/data.bin", dest, md5=PAYLOAD_MD5, sha256=PAYLOAD_SHA256, progress=False, allow_http=True
    )
    assert out == dest
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "sub" / "raw.h5ad.part").exists()
    assert handler.requests == [{"range": None, "sent": len(PAYLOAD)}]


def test_resume_requests_only_the_remainder(server, tmp_path: Path) -> None:
    base, handler = server
    dest = tmp_path / "raw.h5ad"
    part = tmp_path / "raw.h5ad.part"
    part.write_bytes(PAYLOAD[:123_456])
    download_file(f"{base}/data.bin", dest, md5=PAYLOAD_MD5, progress=False, allow_http=True)
    assert dest.read_bytes() == PAYLOAD
    assert handler.requests == [{"range": "bytes=123456-", "sent": len(PAYLOAD) - 123_456}]


def test_server_ignoring_range_restarts_cleanly(server, tmp_path: Path) -> None:
    base, handler = server
    handler.honour_range = False
    dest = tmp_path / "raw.h5ad"
    (tmp_path / "raw.h5ad.part").write_bytes(PAYLOAD[:1000])
    download_file(f"{base}/data.bin", dest, md5=PAYLOAD_MD5, progress=False, allow_http=True)
    assert dest.read_bytes() == PAYLOAD  # not 1000 duplicated bytes + full file


def test_checksum_mismatch_deletes_part_and_names_digests(server, tmp_path: Path) -> None:
    base, _ = server
    dest = tmp_path / "raw.h5ad"
    wrong = "0" * 32
    with pytest.raises(ChecksumError) as info:
        download_file(f"{base}/data.bin", dest, md5=wrong, progress=False, allow_http=True)
    message = str(info.value)
    assert wrong in message and PAYLOAD_MD5 in message
    assert not dest.exists()
    assert not (tmp_path / "raw.h5ad.part").exists()


def test_http_error_names_url_and_manual_location(server, tmp_path: Path) -> None:
    base, _ = server
    dest = tmp_path / "raw.h5ad"
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        download_file(f"{base}/missing.bin", dest, md5=PAYLOAD_MD5, progress=False, allow_http=True)
    assert f"{base}/missing.bin" in str(info.value)
    assert str(dest.resolve()) in str(info.value)


def _refused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed on exit: nothing listens there


def test_offline_error_is_clear(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_refused_port()}/data.bin"
    dest = tmp_path / "raw.h5ad"
    with pytest.raises(DownloadError) as info:
        download_file(url, dest, md5=PAYLOAD_MD5, timeout=5, progress=False, allow_http=True)
    message = str(info.value)
    assert url in message and "offline" in message and str(dest.resolve()) in message
    assert not dest.exists()


def test_dataset_without_checksum_is_refused_unless_allowed(server, tmp_path: Path) -> None:
    base, handler = server
    dest = tmp_path / "raw.h5ad"
    with pytest.raises(DownloadError, match="allow_unverified"):
        download_dataset(f"{base}/data.bin", dest, progress=False, allow_http=True)
    assert handler.requests == []  # refused before touching the network
    download_dataset(f"{base}/data.bin", dest, allow_unverified=True, progress=False, allow_http=True)
    assert dest.read_bytes() == PAYLOAD


def test_dataset_present_by_hand_is_verified_without_network(tmp_path: Path) -> None:
    dest = tmp_path / "raw.h5ad"
    dest.write_bytes(PAYLOAD)
    url = f"http://127.0.0.1:{_refused_port()}/data.bin"
    assert download_dataset(url, dest, md5=PAYLOAD_MD5, progress=False, allow_http=True) == dest
    dest.write_bytes(PAYLOAD[:10])
    with pytest.raises(ChecksumError, match="delete it"):
        download_dataset(url, dest, md5=PAYLOAD_MD5, progress=False, allow_http=True)


def test_complete_part_placed_by_hand_is_used_offline(tmp_path: Path) -> None:
    dest = tmp_path / "raw.h5ad"
    (tmp_path / "raw.h5ad.part").write_bytes(PAYLOAD)
    url = f"http://127.0.0.1:{_refused_port()}/data.bin"
    assert download_file(url, dest, md5=PAYLOAD_MD5, progress=False, allow_http=True).read_bytes() == PAYLOAD
    assert not (tmp_path / "raw.h5ad.part").exists()


# --- URL and redirect policy --------------------------------------------------------------------


class _RedirectHandler(http.server.BaseHTTPRequestHandler):
    """/data.bin serves PAYLOAD; /to-host, /to-file and /same-host redirect (302) as named."""

    served: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        type(self).served.append(self.path)
        port = self.server.server_address[1]
        targets = {
            "/to-host": f"http://localhost:{port}/data.bin",
            "/to-file": "file:///etc/hostname",
            "/same-host": "/data.bin",
        }
        if self.path in targets:
            self.send_response(302)
            self.send_header("Location", targets[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)


@pytest.fixture()
def redirecting():
    handler = type("Handler", (_RedirectHandler,), {"served": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()


def test_http_is_refused_unless_allowed(server, tmp_path: Path) -> None:
    base, handler = server
    with pytest.raises(UnsafeURLError, match="allow_http: true"):
        download_file(f"{base}/data.bin", tmp_path / "raw.h5ad", md5=PAYLOAD_MD5, progress=False)
    with pytest.raises(UnsafeURLError, match="allow_http: true"):
        download_dataset(f"{base}/data.bin", tmp_path / "raw.h5ad", md5=PAYLOAD_MD5, progress=False)
    assert handler.requests == []  # refused before touching the network
    assert not (tmp_path / "raw.h5ad").exists() and not (tmp_path / "raw.h5ad.part").exists()


@pytest.mark.parametrize("url", ["file:///etc/hostname", "ftp://example.org/raw.h5ad", "raw.h5ad"])
def test_other_schemes_are_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(UnsafeURLError, match="source: path"):
        download_file(url, tmp_path / "raw.h5ad", allow_http=True, progress=False)
    assert not (tmp_path / "raw.h5ad").exists()


def test_cross_host_redirect_needs_a_checksum(redirecting, tmp_path: Path) -> None:
    base, handler = redirecting
    dest = tmp_path / "raw.h5ad"
    with pytest.raises(UnsafeURLError, match="another host") as info:
        download_dataset(f"{base}/to-host", dest, allow_unverified=True, allow_http=True, progress=False)
    assert "sha256" in str(info.value) and not dest.exists()
    assert handler.served == ["/to-host"]  # the other host was never asked
    # a pinned file may move hosts: the checksum still protects it
    download_file(f"{base}/to-host", dest, sha256=PAYLOAD_SHA256, allow_http=True, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_same_host_redirect_is_followed_without_checksum(redirecting, tmp_path: Path) -> None:
    base, handler = redirecting
    dest = tmp_path / "raw.h5ad"
    download_dataset(f"{base}/same-host", dest, allow_unverified=True, allow_http=True, progress=False)
    assert dest.read_bytes() == PAYLOAD and handler.served == ["/same-host", "/data.bin"]


def test_redirect_to_file_is_refused_even_when_pinned(redirecting, tmp_path: Path) -> None:
    base, _ = redirecting
    with pytest.raises(UnsafeURLError, match="not an http"):
        download_file(f"{base}/to-file", tmp_path / "raw.h5ad", sha256=PAYLOAD_SHA256, allow_http=True, progress=False)
    assert not (tmp_path / "raw.h5ad").exists()


@pytest.mark.parametrize("pinned", [False, True])
def test_https_to_http_redirect_is_refused(pinned: bool) -> None:
    with pytest.raises(UnsafeURLError, match="downgrade"):
        check_redirect("https://example.org/raw.h5ad", "http://example.org/raw.h5ad", pinned=pinned, allow_http=True)
    check_redirect("https://example.org/a", "https://example.org/b", pinned=False)  # same host, https: fine
    check_redirect("https://example.org/a", "https://cdn.example.net/b", pinned=True)  # pinned: may move host
