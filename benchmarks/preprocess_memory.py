"""Peak memory and wall time of ``ccfm.data.preprocess.preprocess_dataset`` on synthetic sparse counts.

Usage::

    python benchmarks/preprocess_memory.py --cells 200000 [--genes 5000] [--density 0.05]

The input h5ad (CSR raw counts, written chunk by chunk so generating it needs little memory; the
generator of ``memory_scaling.py``) is created in the parent process; preprocessing runs in a
fresh child process that reports its own peak resident set size (:mod:`rss`), so the number is
the preprocessing alone plus the interpreter and imports (reported separately as
``import_rss_mb``). Streaming means the peak should not grow with ``--cells``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from memory_scaling import write_synthetic
from rss import print_report, python_child, report_work, run_child


def child(raw: Path, out: Path, chunk_size: int, n_top_genes: int) -> None:
    """Run preprocessing in this process and print its peak RSS and wall time."""
    from ccfm.data.preprocess import PreprocessSettings, preprocess_dataset

    report = report_work(
        lambda: preprocess_dataset(
            raw, out, PreprocessSettings(dataset="benchmark", n_top_genes=n_top_genes, chunk_size=chunk_size)
        )
    )
    print_report({key: round(value, 1) for key, value in report.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=50000)
    parser.add_argument("--genes", type=int, default=5000)
    parser.add_argument("--density", type=float, default=0.05, help="fraction of non-zero entries")
    parser.add_argument("--chunk-size", type=int, default=10000)
    parser.add_argument("--n-top-genes", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where to put the files (default: a temp dir)")
    parser.add_argument("--child", nargs=2, type=Path, metavar=("RAW", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.chunk_size, args.n_top_genes)
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        raw, out = Path(tmp) / "raw.h5ad", Path(tmp) / "processed.h5ad"
        started = time.perf_counter()
        write_synthetic(raw, args.cells, args.genes, args.density, args.seed)
        generated = time.perf_counter() - started
        command = python_child(
            __file__,
            "--child",
            str(raw),
            str(out),
            "--chunk-size",
            str(args.chunk_size),
            "--n-top-genes",
            str(args.n_top_genes),
        )
        report = run_child(command, f"preprocessing {raw}")
        report.update(
            cells=args.cells,
            genes=args.genes,
            density=args.density,
            chunk_size=args.chunk_size,
            input_mb=round(raw.stat().st_size / 2**20, 1),
            output_mb=round(out.stat().st_size / 2**20, 1),
            generate_s=round(generated, 1),
        )
        print(json.dumps(report))


if __name__ == "__main__":
    main()
