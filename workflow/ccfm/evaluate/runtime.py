"""Where a run's time went: the per-job files of Snakemake's ``benchmark:`` directive, in one table.

Every rule writes ``results/{ds}/benchmarks/<job>.tsv`` (rules shared by datasets, such as the
scGPT checkpoint, write under ``results/benchmarks/``). Each file holds one job's last run: wall
seconds ``s``, CPU seconds ``cpu_time`` and peak resident memory ``max_rss`` (MB).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ccfm.io.atomic import write_table_atomic

RUNTIME_COLUMNS = ("job", "rule", "seconds", "cpu_seconds", "max_rss_mb")


def read_benchmarks(benchmark_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """One row per benchmark file under ``benchmark_dirs``, slowest job first."""
    rows = []
    for directory in map(Path, benchmark_dirs):
        for path in sorted(directory.rglob("*.tsv")):
            frame = pd.read_csv(path, sep="\t")
            if frame.empty or "s" not in frame.columns:
                raise ValueError(f"{path}: not a Snakemake benchmark file (no 's' column)")
            job = path.relative_to(directory).with_suffix("").as_posix()
            rows.append(
                (
                    job,
                    path.stem,
                    float(frame["s"].iloc[-1]),
                    float(frame["cpu_time"].iloc[-1]),
                    float(frame["max_rss"].iloc[-1]),
                )
            )
    if not rows:
        raise ValueError(f"no benchmark files under {[str(d) for d in benchmark_dirs]}")
    table = pd.DataFrame(rows, columns=list(RUNTIME_COLUMNS))
    return table.sort_values("seconds", ascending=False, ignore_index=True)


def write_runtime_report(
    benchmark_dirs: Sequence[str | Path], out_tsv: str | Path, out_png: str | Path, dataset: str
) -> pd.DataFrame:
    """The runtime table (with a ``total`` row) as TSV and a bar chart of seconds per job."""
    from ccfm.evaluate.plots import plot_runtime

    table = read_benchmarks(benchmark_dirs)
    total_row = ("total", "all", table["seconds"].sum(), table["cpu_seconds"].sum(), table["max_rss_mb"].max())
    total = pd.DataFrame([total_row], columns=list(RUNTIME_COLUMNS))
    full = pd.concat([table, total], ignore_index=True)
    write_table_atomic(full, out_tsv, sep="\t", index=False, float_format="%.2f")
    plot_runtime(table, out_png, dataset)
    return table
