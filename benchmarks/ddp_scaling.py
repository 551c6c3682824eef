"""Data-parallel training throughput: 1 process versus N torchrun processes (train.gpus).

Trains the same model on the same synthetic processed.h5ad once in a single process and once
with ``N`` data-parallel processes (``ccfm.model.training.train_distributed``: NCCL on GPUs when N are
visible, gloo on CPU otherwise), and reports training cells/s (global batch × steps / loop time,
from the trainer's own timing, so process start-up and data loading are excluded), the
wall time including start-up, and whether the loss logs agree.

    python benchmarks/ddp_scaling.py [--processes 2] [--steps 60] [--genes 2000] [--window 512]
        [--batch 32] [--d-model 64] [--layers 2] [--out benchmarks/results/ddp_scaling.md]

On a CPU each process uses one thread, so N processes use N cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ccfm.model.training import TrainRequest, train_distributed, train_from_files

SEED = 0


def write_synthetic(root: Path, n_genes: int, n_perturbations: int = 12, cells: int = 200) -> tuple[Path, Path]:
    """Sparse log1p data: controls plus single perturbations shifting a few genes each."""
    rng = np.random.default_rng(SEED)
    labels = ["non-targeting"] + [f"G{i}" for i in range(n_perturbations)]
    blocks, obs = [], []
    for label in labels:
        counts = rng.poisson(0.3, size=(cells, n_genes)).astype(np.float32)
        if label != "non-targeting":
            gene = int(label[1:])
            counts[:, gene] = 0
            counts[:, n_perturbations + gene] += 4
        blocks.append(sp.csr_matrix(np.log1p(counts)))
        obs += [label] * cells
    adata = ad.AnnData(
        X=sp.vstack(blocks).tocsr(),
        obs=pd.DataFrame({"target_gene": pd.Categorical(obs)}, index=[f"c{i}" for i in range(len(obs))]),
        var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]),
    )
    processed = root / "processed.h5ad"
    adata.write_h5ad(processed)
    split = root / "fold1.json"
    split.write_text(json.dumps({"fold": 1, "train": labels[1:-2], "test": labels[-2:], "controls": "non-targeting"}))
    return processed, split


def loop_seconds(log_text: str) -> float:
    """The trainer's own loop time from its log line ``trained N steps (...) in X s``."""
    found = re.findall(r"trained \d+ steps \(resumed from \d+\) in ([0-9.]+) s", log_text)
    if not found:
        raise RuntimeError("the training log has no 'trained N steps' line")
    return float(found[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ddp_scaling.md")
    args = parser.parse_args()

    torch.set_num_threads(1)
    model = {"d_model": args.d_model, "nhead": 4, "nlayers": args.layers, "bottleneck": 16, "dh_depth": 1}
    train = {
        "steps": args.steps,
        "batch_size": args.batch,
        "lr": 1e-3,
        "warmup_steps": 5,
        "infer_top_gene": args.window,
        "checkpoint_every": args.steps,
        "log_every": 10,
        "gpus": args.processes,
    }
    cuda = torch.cuda.is_available()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        processed, split = write_synthetic(root, args.genes)
        common = dict(
            processed_h5ad=processed,
            split_json=split,
            model_section=model,
            train_section=train,
            latent_section={},
            seed=SEED,
            use_latent=False,
        )
        for processes in (1, args.processes):
            out = root / f"p{processes}"
            log_path = root / f"p{processes}.log"
            log_path.write_text("")
            started = time.perf_counter()
            files = {"out_model": out / "model.pt", "out_loss": out / "loss.tsv", "resume_dir": out / "resume"}
            if processes == 1:
                result = train_from_files(
                    TrainRequest(
                        **files,
                        **common,
                    ),
                    device="cuda" if cuda else "cpu",
                    progress=False,
                )
                seconds = result.seconds
            else:
                train_distributed(
                    processes,
                    log_path,
                    TrainRequest(
                        **files,
                        **common,
                    ),
                )
                seconds = loop_seconds(log_path.read_text())
            wall = time.perf_counter() - started
            cells = args.steps * args.batch
            rows.append(
                {
                    "processes": processes,
                    "loop_s": seconds,
                    "wall_s": wall,
                    "cells_per_s": cells / seconds,
                    "loss": pd.read_csv(out / "loss.tsv", sep="\t"),
                }
            )
    deviation = float(np.max(np.abs(rows[1]["loss"]["total"].to_numpy() - rows[0]["loss"]["total"].to_numpy())))
    machine = (
        f"{platform.processor() or platform.machine()}, {_cpu_model()}, {torch.get_num_threads()} thread(s) per process"
    )
    device = torch.cuda.get_device_name(0) if cuda else "CPU (gloo)"
    lines = [
        "# Data-parallel training throughput",
        "",
        f"Machine: {machine}; device: {device}; torch {torch.__version__}.",
        f"Command: `python benchmarks/ddp_scaling.py --processes {args.processes} --steps {args.steps} --genes "
        f"{args.genes} "
        f"--window {args.window} --batch {args.batch} --d-model {args.d_model} --layers {args.layers}`",
        "",
        "| processes | loop s | wall s (incl. start-up) | training cells/s | speed-up |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['processes']} | {row['loop_s']:.1f} | {row['wall_s']:.1f} | {row['cells_per_s']:.1f} | "
            f"{row['cells_per_s'] / rows[0]['cells_per_s']:.2f}× |"
        )
    lines += ["", f"Largest difference between the two loss logs (total loss): {deviation:.2e}."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


if __name__ == "__main__":
    main()
