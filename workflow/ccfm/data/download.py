"""Resumable, checksum-verified downloads for datasets and model weights.

:func:`download_file` streams a URL to ``<dest>.part`` beside the destination, resumes an
interrupted transfer with an HTTP ``Range`` request, verifies the checksum and only then renames
the file into place, so a half-written file never looks complete. Every network failure becomes a
:class:`DownloadError` whose message names the URL and where to put the file by hand (the
development and CI machines have no internet; users behind firewalls often fetch files elsewhere).

Only https is fetched unless the caller asks for http (config ``allow_http: true``); ``file://``
and every other scheme are refused. Redirects are followed only to https (or http when asked),
never from https down to http, and to another host only when a checksum pins the file (without
one nothing else would notice a replaced file).

Only the standard library is used (``urllib``), so nothing beyond the package's declared
dependencies is needed.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from tqdm import tqdm

from ccfm.io.atomic import OutputWriteError, describe_write_fault, is_write_fault

log = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20
_USER_AGENT = "ccfm-pipeline/0.1 (+https://github.com/; python-urllib)"


class DownloadError(RuntimeError):
    """A download failed; the message names the URL, the cause and the manual fix."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not match the published checksum."""


class UnsafeURLError(DownloadError):
    """A URL or a redirect the download policy refuses (scheme, downgrade, unpinned host change)."""


def check_url(url: str, *, allow_http: bool = False, key: str = "url") -> None:
    """Refuse a URL that is not https (http only with ``allow_http``); ``file://`` and others always."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "https" or (scheme == "http" and allow_http):
        return
    if scheme == "http":
        raise UnsafeURLError(
            f"refusing to download {url}: plain http can be read and altered on the way. Fix: use the "
            f"https address, or set 'allow_http: true' next to '{key}' in config/config.yaml to accept http."
        )
    raise UnsafeURLError(
        f"refusing to download {url}: only https (and http when allowed) URLs are fetched, not "
        f"{scheme + '://' if scheme else 'a URL without a scheme'}. Fix: for a local file use "
        f"'source: path' with 'path:' in config/config.yaml."
    )


def check_redirect(old_url: str, new_url: str, *, pinned: bool, allow_http: bool = False) -> None:
    """Refuse a redirect that leaves https/http, downgrades https to http, or (unpinned) changes host."""
    old, new = urllib.parse.urlsplit(old_url), urllib.parse.urlsplit(new_url)
    if new.scheme.lower() not in ("https", "http"):
        raise UnsafeURLError(f"refusing the redirect from {old_url} to {new_url}: not an http(s) URL")
    if old.scheme.lower() == "https" and new.scheme.lower() == "http":
        raise UnsafeURLError(
            f"refusing the redirect from {old_url} to {new_url}: a downgrade from https to http. "
            f"Fix: use a URL that stays on https."
        )
    if new.scheme.lower() == "http" and not allow_http:
        raise UnsafeURLError(f"refusing the redirect from {old_url} to {new_url}: http is not allowed")
    if not pinned and (new.hostname or "").lower() != (old.hostname or "").lower():
        raise UnsafeURLError(
            f"refusing the redirect from {old_url} to another host ({new_url}) for a file without a "
            f"checksum: nothing would notice a replaced file. Fix: set 'md5' or 'sha256' for it in "
            f"config/config.yaml (or use the final URL directly)."
        )


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Redirect handler applying :func:`check_redirect` to every hop."""

    def __init__(self, pinned: bool, allow_http: bool) -> None:
        super().__init__()
        self.pinned, self.allow_http = pinned, allow_http

    def http_error_302(self, req, fp, code, msg, headers):  # noqa: ANN001 - urllib API
        # Checked before urllib's own scheme test, so every refusal carries the same explanation.
        location = headers.get("location") or headers.get("uri")
        if location:
            newurl = urllib.parse.urljoin(req.full_url, location)
            check_redirect(req.full_url, newurl, pinned=self.pinned, allow_http=self.allow_http)
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _manual_hint(url: str, dest: Path) -> str:
    part = dest.parent / (dest.name + ".part")
    return (
        f"If this machine is offline, download {url} elsewhere and place it at {dest.resolve()} "
        f"(to have its checksum verified on the next run, place it at {part.resolve()} instead)."
    )


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in 1 MiB blocks so memory stays flat for multi-GB files."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksum(path: Path, *, md5: str | None = None, sha256: str | None = None) -> None:
    """Raise :class:`ChecksumError` if ``path`` does not match every checksum given."""
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected is None:
            continue
        got = file_digest(path, algorithm)
        if got.lower() != expected.lower():
            raise ChecksumError(f"{algorithm} mismatch for {path}: expected {expected.lower()}, got {got}")


def _matches(path: Path, *, md5: str | None, sha256: str | None) -> bool:
    try:
        verify_checksum(path, md5=md5, sha256=sha256)
    except ChecksumError:
        return False
    return True


def _open(url: str, offset: int, timeout: float, *, pinned: bool = False, allow_http: bool = False):
    headers: Mapping[str, str] = {"User-Agent": _USER_AGENT}
    if offset > 0:
        headers = {**headers, "Range": f"bytes={offset}-"}
    request = urllib.request.Request(url, headers=dict(headers))
    # No FileHandler/FTPHandler: a redirect (or URL) to file:// or ftp:// has no handler either.
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        _CheckedRedirects(pinned, allow_http),
    ):
        opener.add_handler(handler)
    return opener.open(request, timeout=timeout)


def _total_size(response, offset: int) -> int | None:
    """Full file size from Content-Range (206) or Content-Length (200), if the server says."""
    content_range = response.headers.get("Content-Range")
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        if total.isdigit():
            return int(total)
    length = response.headers.get("Content-Length")
    if length and length.isdigit():
        return int(length) + (offset if response.status == 206 else 0)
    return None


def _stream_to_part(
    url: str, part: Path, timeout: float, progress: bool, *, pinned: bool = False, allow_http: bool = False
) -> None:
    """Append the remainder of ``url`` to ``part``; restart from zero if Range is ignored."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset, timeout, pinned=pinned, allow_http=allow_http)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset > 0:
            # Range Not Satisfiable: the .part is already complete (or longer than the file);
            # let the checksum decide whether it is usable.
            log.info("server reports %s already complete (%d bytes)", part, offset)
            return
        raise
    with response:
        if offset > 0 and response.status != 206:
            # The server ignored Range and sends the whole file: appending would corrupt it.
            log.warning("server ignored the Range request for %s; restarting from byte 0", url)
            offset = 0
        mode = "ab" if offset > 0 else "wb"
        total = _total_size(response, offset)
        if offset:
            log.info("resuming %s at byte %d", url, offset)
        with (
            open(part, mode) as handle,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                desc=part.name.removesuffix(".part"),
                disable=not progress,
            ) as bar,
        ):
            received = offset
            for block in iter(lambda: response.read(_CHUNK_BYTES), b""):
                handle.write(block)
                received += len(block)
                bar.update(len(block))
            handle.flush()
            os.fsync(handle.fileno())
    # http.client returns b"" when the connection drops mid-body (no IncompleteRead for
    # read(amt)): without this check a truncated transfer would look complete, be accepted
    # unverified, or have its resumable .part deleted by the checksum check.
    if total is not None and received < total:
        raise DownloadError(
            f"downloading {url}: the connection closed after {received} of {total} bytes. The "
            f"partial file is kept at {part} and the next run resumes it (rerun the pipeline)."
        )


def _raise_unreachable(error: Exception, url: str, dest: Path, part: Path) -> None:
    reason = getattr(error, "reason", error)
    raise DownloadError(
        f"downloading {url} failed: cannot reach the server ({reason}); the machine may be "
        f"offline or DNS failed. A partial file, if any, is kept at {part} and the next run "
        f"resumes it. {_manual_hint(url, dest)}"
    ) from error


def download_file(
    url: str,
    dest: Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    timeout: float = 30.0,
    progress: bool = True,
    allow_http: bool = False,
) -> Path:
    """Download ``url`` to ``dest`` with resume and checksum verification; return ``dest``.

    The bytes go to ``dest.parent / (dest.name + ".part")``; an existing ``.part`` is resumed
    with a ``Range`` request (servers that ignore Range trigger a clean restart). When ``md5``
    and/or ``sha256`` are given the file must match them: on mismatch the ``.part`` is deleted
    and :class:`ChecksumError` names expected and actual digests. Without a checksum the file is
    accepted and its md5 and sha256 are logged so the caller can pin them (refusing unverified
    *datasets* is the job of :func:`download_dataset`). Network failures raise
    :class:`DownloadError` naming the URL and where to place the file by hand. URLs and redirects
    follow the module's policy (:func:`check_url`, :func:`check_redirect`: :class:`UnsafeURLError`);
    a full disk while writing the ``.part`` names the device and file.
    """
    check_url(url, allow_http=allow_http)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.parent / (dest.name + ".part")
    if part.exists() and (md5 or sha256) and _matches(part, md5=md5, sha256=sha256):
        # A complete .part (interrupted just before the rename, or put there by hand): no network.
        log.info("%s already complete and verified", part)
        os.replace(part, dest)
        return dest
    try:
        _stream_to_part(url, part, timeout, progress, pinned=bool(md5 or sha256), allow_http=allow_http)
    except urllib.error.HTTPError as error:
        raise DownloadError(
            f"downloading {url} failed: HTTP {error.code} {error.reason}. {_manual_hint(url, dest)}"
        ) from error
    except OSError as error:
        if not isinstance(error, urllib.error.URLError) and is_write_fault(error):
            raise OutputWriteError(describe_write_fault(error, part), error.errno) from error
        if not isinstance(error, (urllib.error.URLError, TimeoutError, ConnectionError)):
            raise
        _raise_unreachable(error, url, dest, part)
    except http.client.HTTPException as error:
        _raise_unreachable(error, url, dest, part)
    try:
        verify_checksum(part, md5=md5, sha256=sha256)
    except ChecksumError as error:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{error} (downloaded from {url}; the partial file was deleted, rerun to retry)") from None
    if md5 is None and sha256 is None:
        log.warning(
            "no checksum given for %s; md5=%s sha256=%s (put one in the config to pin this file)",
            url,
            file_digest(part, "md5"),
            file_digest(part, "sha256"),
        )
    os.replace(part, dest)
    log.info("downloaded %s -> %s", url, dest)
    return dest


def download_dataset(
    url: str | None,
    dest: Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    allow_unverified: bool = False,
    timeout: float = 30.0,
    progress: bool = True,
    allow_http: bool = False,
) -> Path:
    """Fetch a dataset file declared in the config (``source: url``).

    A dataset must carry a published checksum (``md5`` or ``sha256`` in its config block): real
    datasets are large and silently truncated or replaced files would corrupt every downstream
    result. A user who cannot get one sets ``allow_unverified: true`` in the dataset block and
    the digests are logged instead. A file already at ``dest`` (put there by hand) is verified
    and kept without touching the network.
    """
    dest = Path(dest)
    if not url:
        raise DownloadError(
            f"no URL configured for {dest}: set 'url' (and 'md5') in the dataset block of "
            f"config/config.yaml, or use 'source: path' with a local file."
        )
    check_url(url, allow_http=allow_http)
    if md5 is None and sha256 is None and not allow_unverified:
        raise DownloadError(
            f"refusing to download {url} without a checksum: set 'md5' or 'sha256' for this "
            f"dataset in config/config.yaml (Zenodo lists md5 on the record page), or set "
            f"'allow_unverified: true' in the dataset block to accept it unverified."
        )
    if dest.exists():
        try:
            verify_checksum(dest, md5=md5, sha256=sha256)
        except ChecksumError as error:
            raise ChecksumError(
                f"{error}. The file at {dest} is not the expected one: delete it so the pipeline "
                f"downloads it again from {url}."
            ) from None
        log.info("%s already present and verified; not downloading", dest)
        return dest
    return download_file(url, dest, md5=md5, sha256=sha256, timeout=timeout, progress=progress, allow_http=allow_http)
