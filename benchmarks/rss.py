"""Peak resident memory of one piece of work, measured in a fresh child process.

A benchmark script re-invokes itself (or another script) as a child; the child runs the work
through :func:`report_work` and prints the report as its last stdout line; the parent collects it
with :func:`run_child`. A fresh process matters: ``VmHWM`` (the kernel's high-water mark of the
resident set) is per address space and reset by exec, so the child's number is the work alone
plus the interpreter and imports, which :func:`report_work` reports separately.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

# One thread per library: the numbers should not depend on the machine's core count, and
# per-thread scratch buffers would otherwise blur the comparison between sizes.
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def peak_rss_mb() -> float:
    """Peak RSS of this process in MiB.

    ``VmHWM`` from /proc/self/status where available; ``ru_maxrss`` only as the fallback off
    Linux, because after fork+exec it still holds the parent's peak.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def report_work(work: Callable[[], Any]) -> dict[str, float]:
    """Run ``work()`` here; return peak RSS after it, peak RSS before it (imports) and wall time.

    Import what the work needs *before* calling this, so ``import_rss_mb`` covers the libraries
    and ``peak_rss_mb - import_rss_mb`` is what the work itself added.
    """
    before = peak_rss_mb()
    started = time.perf_counter()
    work()
    return {"peak_rss_mb": peak_rss_mb(), "import_rss_mb": before, "wall_s": time.perf_counter() - started}


def print_report(report: Mapping[str, Any]) -> None:
    """The child's side of :func:`run_child`: the report as one JSON line on stdout."""
    print(json.dumps(dict(report)), flush=True)


def run_child(command: Sequence[str], what: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ``command`` (a child that ends with :func:`print_report`) and return its report.

    ``env`` is added to the current environment on top of :data:`SINGLE_THREAD_ENV`. Raises
    with the tail of the child's stderr, naming ``what``, if the child fails.
    """
    environment = {**os.environ, **SINGLE_THREAD_ENV, **dict(env or {})}
    result = subprocess.run(list(command), check=False, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    lines = result.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{what} printed no report; stderr:\n{result.stderr[-4000:]}")
    return json.loads(lines[-1])


def python_child(script: str | Path, *args: str) -> list[str]:
    """The command line that runs ``script`` with this interpreter."""
    return [sys.executable, str(script), *args]
