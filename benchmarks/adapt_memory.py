"""Peak memory of MMD shift learning versus the number of target control cells.

Learns a shift on synthetic sparse log1p controls of growing size with a fixed random encoder
and prints the peak of the numpy memory allocated *inside* ``learn_shift`` (tracemalloc: dense
batches, index arrays) next to the size of the CSR inputs and of what a dense copy of them would
need. The learner's own peak should stay flat in the number of cells (one batch at a time), far
below the dense size. The process-wide peak RSS is printed too (it includes building the data).

    python benchmarks/adapt_memory.py --genes 2000 --cells 5000 20000 80000
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
import scipy.sparse as sp
import torch
from rss import peak_rss_mb

from ccfm.adapt.shift import AdaptSettings, learn_shift


def _controls(n_cells: int, n_genes: int, density: float, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    matrix = sp.random(n_cells, n_genes, density=density, format="csr", random_state=rng, dtype=np.float32)
    matrix.data = np.log1p(matrix.data * 20).astype(np.float32)
    return matrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--cells", type=int, nargs="+", default=[5000, 20000, 80000])
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    weight = torch.randn(args.genes, 32, generator=torch.Generator().manual_seed(0)) / args.genes**0.5

    def encode(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ weight)

    # Warm-up on a tiny problem so one-time lazy initialisation is not counted as the learner's.
    tiny = _controls(200, args.genes, args.density, 0)
    learn_shift(encode, tiny, tiny, AdaptSettings(steps=2, eval_every=1), seed=0, progress=False)
    print(f"{'cells':>8} {'csr MB':>8} {'dense MB':>9} {'learner peak MB':>16} {'process RSS MB':>15} {'seconds':>8}")
    for n_cells in args.cells:
        source = _controls(n_cells, args.genes, args.density, 1)
        target = _controls(n_cells, args.genes, args.density, 2)
        csr_mb = 2 * (target.data.nbytes + target.indices.nbytes + target.indptr.nbytes) / 2**20
        dense_mb = 2 * n_cells * args.genes * 4 / 2**20
        started = time.perf_counter()
        tracemalloc.start()
        learn_shift(encode, target, source, AdaptSettings(steps=args.steps, eval_every=10), seed=0, progress=False)
        _, learner_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        seconds = time.perf_counter() - started
        print(
            f"{n_cells:>8} {csr_mb:>8.0f} {dense_mb:>9.0f} {learner_peak / 2**20:>16.1f} {peak_rss_mb():>15.0f} "
            f"{seconds:>8.1f}"
        )


if __name__ == "__main__":
    main()
