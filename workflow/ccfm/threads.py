"""Keep a job's native thread pools within the threads its rule declares.

Snakemake exports OMP/MKL/OpenBLAS thread counts for a job, which torch and numpy follow; numba
(cell-eval's DE tests) and polars size their pools from the machine's core count instead, so a
2-thread scoring job on a 64-core node would start 64 threads. Call this before they are imported.
"""

from __future__ import annotations

import os

POOL_VARIABLES = (
    "NUMBA_NUM_THREADS",
    "POLARS_MAX_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
)


def limit_native_threads(threads: int) -> None:
    """Set every pool-size variable to ``threads`` (at least 1)."""
    for name in POOL_VARIABLES:
        os.environ[name] = str(max(1, int(threads)))
