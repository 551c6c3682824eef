"""Atomic writes: one primitive, :func:`atomic_output`, and the writers built on it.

:func:`atomic_output` yields a temporary path in the output's own directory and renames it onto
the output only when the block succeeds (removing it otherwise), so an interrupted job never
leaves a file that Snakemake would take as finished. A storage fault (disk full, quota,
read-only, I/O error) is re-raised as :class:`OutputWriteError` naming the device and the file.
:func:`write_text_atomic`, :func:`write_binary_atomic` and :func:`write_table_atomic` are the
common cases of it; every writer of the package goes through this module.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pandas as pd

log = logging.getLogger(__name__)


# Errors of the storage, not of the data: translated into "no space left on <device> while writing <file>".
WRITE_FAULT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})


class OutputWriteError(OSError):
    """Writing an output failed for a reason of the storage (disk full, quota, read-only, I/O error).

    The message names the device (and its mount point) and the file; nothing was renamed into place.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


def is_write_fault(error: OSError) -> bool:
    """Whether ``error`` comes from the storage (by errno, or by h5py's "errno = 28" text)."""
    if error.errno in WRITE_FAULT_ERRNOS:
        return True
    found = re.search(r"errno = (\d+)", str(error))
    return found is not None and int(found.group(1)) in WRITE_FAULT_ERRNOS


def device_of(path: str | Path) -> str:
    """``<device> (mounted at <mount point>)`` of the filesystem holding ``path`` (from /proc/mounts)."""
    folder = Path(path).resolve().parent
    best: tuple[str, str] | None = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) < 2:
                continue
            device, mount = fields[0], fields[1].replace("\\040", " ")
            if (folder == Path(mount) or Path(mount) in folder.parents) and (best is None or len(mount) > len(best[1])):
                best = (device, mount)
    if best is None:
        return f"the device holding {folder}"
    return f"{best[0]} (mounted at {best[1]})"


def describe_write_fault(error: OSError, path: str | Path) -> str:
    """Plain words for a storage error while writing ``path``: device, file, free space and the fix."""
    path = Path(path)
    code = error.errno
    if code is None:
        found = re.search(r"errno = (\d+)", str(error))
        code = int(found.group(1)) if found else None
    device = device_of(path)
    free = ""
    with contextlib.suppress(OSError):
        free = f" ({os.statvfs(path.parent).f_bavail * os.statvfs(path.parent).f_frsize / 2**30:.2f} GiB free now)"
    if code in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left" if code == errno.ENOSPC else "disk quota exceeded"
        return (
            f"{what} on {device} while writing {path}{free}; nothing was written to {path.name}. "
            f"Fix: free space there (or point the results to a larger disk) and rerun."
        )
    reason = os.strerror(code) if code is not None else str(error)
    return f"{reason} on {device} while writing {path}{free}; nothing was written to {path.name}."


@contextlib.contextmanager
def atomic_output(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file lives in the same directory so :func:`os.replace` is an atomic rename;
    on an exception it is deleted and ``path`` is left untouched. A SIGKILL skips that cleanup, so
    temporaries of ``path`` left by an earlier (killed) writer are removed first: Snakemake runs
    one job per output at a time, so no live writer owns them, and SLURM retries would otherwise
    pile up multi-GB hidden files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(path):
        log.warning("removing %s, a temporary file a killed job left behind", stale)
        stale.unlink(missing_ok=True)
    # A unique name that is not created here: the writer creates it with the usual permissions.
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}{suffix if suffix is not None else '.tmp' + path.suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        if isinstance(error, OutputWriteError) or not is_write_fault(error):
            raise
        raise OutputWriteError(describe_write_fault(error, path), error.errno) from error
    finally:
        tmp.unlink(missing_ok=True)


def stale_temporaries(path: str | Path) -> list[Path]:
    """Hidden temporary files :func:`atomic_output` left beside ``path`` (a killed writer's)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    # Names are ``.<name>.<12 hex>.<suffix>``; the hex part keeps other files out of the match.
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.[0-9a-f]{{12}}(\..*)?$")
    return sorted(p for p in path.parent.iterdir() if pattern.match(p.name))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_binary_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write`` on a binary file object of a temporary beside ``path``, then rename it into place.

    For ``torch.save`` pass ``functools.partial(torch.save, obj)``: through a Python file object a
    full disk raises ``OSError(ENOSPC)``, which :func:`atomic_output` names with device and file,
    instead of torch's "unexpected pos" from its own writer.
    """
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        write(handle)
    return Path(path)


def write_table_atomic(
    frame: pd.DataFrame, path: str | Path, sep: str = ",", index: bool = True, float_format: str | None = None
) -> None:
    """Write a CSV/TSV (missing values as empty cells) atomically."""
    with atomic_output(path) as tmp:
        frame.to_csv(tmp, sep=sep, index=index, float_format=float_format)
