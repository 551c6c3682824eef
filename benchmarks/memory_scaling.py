"""Peak RSS of every data, model and adaptation stage at two dataset sizes (issue 8).

Usage::

    python benchmarks/memory_scaling.py [--cells 50000 200000] [--genes 5000] [--density 0.05]
        [--repeats 3] [--workdir /tmp/ccfm-memory-scaling] [--stages preprocess,...,adapt_model]

For each size a synthetic CSR raw-counts h5ad (real gene symbols from the scGPT census vocab,
~``density`` non-zero, 20 conditions incl. controls and doubles) is generated chunk by chunk.
Each stage then runs in a fresh child process (``--child``) that reports its own peak resident
set size and wall time (:mod:`rss`), ``--repeats`` times: the peak of the model stages varies by
tens of MB from run to run (the allocator's heap layout), so the table gives the median and the
range. Stages feed each other as in the pipeline::

    raw -> preprocess -> processed -> split -> real, split.json
        -> calibration (tiny scGPT)          -> latent_stats.pt
        -> baseline (additive)               -> pred.h5ad
        -> adaptation (fixed random encoder) -> nothing; the data path of learn_shift alone
        -> train (small CCFM, no latent)     -> ccfm/model.pt
        -> predict (rule `predict`)          -> ccfm/pred.h5ad
        -> adapt_model (rule `adapt_mmd`)    -> ccfm/shift.safetensors
    raw -> preprocess_target (on processed's genes) -> target_processed.h5ad

The criterion (issue 8): peak RSS must not grow with the number of cells beyond what the stage
must hold. Besides the peak, the table gives the stage's output size on disk (``output_mb``) and
the in-memory size of processed.h5ad's X as CSR (``processed_x_mb``) as the yardstick. Work per
stage is fixed (not proportional to the cells) so that differences between sizes are memory
scaling, not more work. The table is printed and written to
``benchmarks/results/memory_scaling.tsv`` (atomically).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from rss import print_report, python_child, report_work, run_child

SEED = 0
# The CCFM model of the train/predict/adapt_model stages: small, no scGPT latent stream (its
# memory is the model's, independent of the cells; the data paths are what is measured).
CCFM_MODEL = {"d_model": 32, "nhead": 4, "nlayers": 1, "bottleneck": 8, "dh_depth": 1}
CCFM_TRAIN = {
    "steps": 20,
    "batch_size": 16,
    "lr": 1e-3,
    "warmup_steps": 2,
    "infer_top_gene": 256,
    "checkpoint_every": 10,
    "log_every": 5,
}
# Prediction over all genes costs ~2 s per 32-cell Euler step on one core: few cells, few steps
# (the peak is set by one batch's forward pass, not by the number of steps).
CCFM_GENERATE = {"cells_per_perturbation": 32, "method": "euler", "latent_steps": 1, "expr_steps": 2, "batch_size": 32}
CCFM_ADAPT = {"steps": 40, "batch_size": 64, "eval_every": 20, "eval_cells": 256, "patience": 2, "encoding": "tokens"}


def gene_symbols(n_genes: int) -> list[str]:
    """The first ``n_genes`` gene symbols of the scGPT census vocab (so calibration maps them)."""
    from ccfm.scgpt.checkpoint import census_vocab_with_specials

    vocab = census_vocab_with_specials()
    symbols = [g for g in sorted(vocab, key=vocab.get) if not g.startswith("<")]
    if len(symbols) < n_genes:
        raise ValueError(f"the census vocab has only {len(symbols)} genes, asked for {n_genes}")
    return symbols[:n_genes]


def write_synthetic(path: Path, n_cells: int, n_genes: int, density: float, seed: int, chunk: int = 10000) -> None:
    """Sparse raw counts written chunk by chunk (generation memory is one chunk)."""
    from ccfm.io.atomic import atomic_output
    from ccfm.io.h5ad import CSRH5adWriter

    rng = np.random.default_rng(seed)
    genes = gene_symbols(n_genes)
    gene_mean = rng.lognormal(0.0, 1.0, size=n_genes)
    labels = np.array(["non-targeting"] + genes[:10] + [f"{genes[i]}+{genes[i + 1]}" for i in range(0, 18, 2)])
    with atomic_output(path) as tmp, CSRH5adWriter(tmp, pd.DataFrame(index=genes)) as writer:
        for start in range(0, n_cells, chunk):
            rows = min(chunk, n_cells - start)
            block = sp.random_array((rows, n_genes), density=density, format="csr", dtype=np.float32, rng=rng)
            block.data = (1 + rng.poisson(gene_mean[block.indices])).astype(np.float32)
            writer.append(sp.csr_matrix(block))
        obs = pd.DataFrame(
            {"target_gene": pd.Categorical(rng.choice(labels, size=n_cells))},
            index=pd.Index([f"cell{i}" for i in range(n_cells)]),
        )
        writer.finish(obs)


# ---------------------------------------------------------------- stages (run in the child)


def _preprocess(work: Path) -> None:
    from ccfm.data.preprocess import PreprocessSettings, preprocess_dataset

    preprocess_dataset(
        work / "raw.h5ad",
        work / "processed.h5ad",
        PreprocessSettings(dataset="bench", n_top_genes=2000, chunk_size=10000),
    )


def _preprocess_target(work: Path) -> None:
    from ccfm.data.preprocess import TargetSettings, preprocess_target

    preprocess_target(
        work / "raw.h5ad",
        work / "processed.h5ad",
        work / "target_processed.h5ad",
        TargetSettings(dataset="bench", chunk_size=10000),
    )


def _split(work: Path) -> None:
    from ccfm.data.splits import split_for_processed, write_real, write_split

    split = split_for_processed(work / "processed.h5ad", fold=1, seed=SEED, heldout_fraction=0.3, n_folds=5)
    write_real(work / "processed.h5ad", split, work / "real.h5ad", chunk_size=10000)
    write_split(split, work / "split.json")


def _calibration(work: Path) -> None:
    from ccfm.io.h5ad import read_var
    from ccfm.scgpt.calibration import calibrate, training_cell_indices
    from ccfm.scgpt.checkpoint import build_tiny_checkpoint, read_vocab
    from ccfm.scgpt.extractor import ExtractorSettings, ScGPTFeatureExtractor

    model_dir = work.parent / "tiny_scgpt"
    if not (model_dir / "best_model.pt").exists():
        build_tiny_checkpoint(model_dir, seed=SEED)
    vocab = read_vocab(model_dir / "vocab.json")
    genes = list(read_var(work / "processed.h5ad").index.astype(str))
    ids = np.array([vocab.get(g, -1) for g in genes], dtype=np.int64)
    extractor = ScGPTFeatureExtractor(
        model_dir, ids, device="cpu", settings=ExtractorSettings(max_tokens_per_cell=1200, seed=SEED, zero_tokens=False)
    )
    cells = training_cell_indices(work / "processed.h5ad", work / "split.json")
    stats = calibrate(extractor, work / "processed.h5ad", cells, batch_size=32, max_cells=2000, seed=SEED, genes=genes)
    stats.save(work / "latent_stats.pt")


def _baseline(work: Path) -> None:
    from ccfm.evaluate.baselines import BaselineOptions, run_baseline

    run_baseline(
        "additive",
        work / "processed.h5ad",
        work / "split.json",
        work / "real.h5ad",
        work / "pred.h5ad",
        work / "pred_means.csv",
        BaselineOptions(cells_per_perturbation=128, seed=SEED, chunk_size=10000),
    )


def _adaptation(work: Path) -> None:
    """The adaptation data path (ccfm.io.h5ad.read_control_cells + learn_shift) with a fixed encoder.

    A fixed random projection stands in for the model's control encoder, so this isolates the
    control-cell reading and the learner; ``adapt_model`` runs the rule with a trained model.
    """
    import torch

    from ccfm.adapt.shift import AdaptSettings, learn_shift
    from ccfm.io.h5ad import read_control_cells

    source = read_control_cells(work / "processed.h5ad")
    target = read_control_cells(work / "target_processed.h5ad")
    generator = torch.Generator().manual_seed(SEED)
    projection = torch.randn(source.matrix.shape[1], 64, generator=generator) / source.matrix.shape[1] ** 0.5

    def encode(x: torch.Tensor) -> torch.Tensor:
        return x @ projection

    settings = AdaptSettings(steps=50, batch_size=128, eval_every=25)
    learn_shift(encode, target.matrix, source.matrix, settings, seed=SEED, progress=False)


def _train(work: Path) -> None:
    """A few steps of the train_ccfm rule (latent stream off: no scGPT), from scratch."""
    from ccfm.model.training import TrainRequest, train_from_files

    out = work / "ccfm"
    shutil.rmtree(out / "resume", ignore_errors=True)  # a finished checkpoint would skip the loop
    train_from_files(
        TrainRequest(
            processed_h5ad=work / "processed.h5ad",
            split_json=work / "split.json",
            out_model=out / "model.pt",
            out_loss=out / "loss.tsv",
            resume_dir=out / "resume",
            model_section=CCFM_MODEL,
            train_section=CCFM_TRAIN,
            latent_section={},
            seed=SEED,
            use_latent=False,
        ),
        device="cpu",
        progress=False,
    )


def _predict(work: Path) -> None:
    """The predict rule: every held-out perturbation of the fold from the trained model."""
    from ccfm.model.generation import predict_to_files, prepare_generation

    out = work / "ccfm"
    generation = prepare_generation(out / "model.pt", CCFM_GENERATE, threads=1, device="cpu")
    predict_to_files(
        generation,
        work / "processed.h5ad",
        work / "split.json",
        [],
        out / "pred.h5ad",
        out / "pred_means.csv",
        seed=SEED,
    )


def _adapt_model(work: Path) -> None:
    """The adapt_mmd rule: MMD shift of the target controls through the trained model's control encoder."""
    from ccfm.adapt.adaptable import ModelSpec, load_adaptable
    from ccfm.adapt.files import AdaptInputs, ShiftFiles, adapt_to_files
    from ccfm.adapt.shift import AdaptSettings

    out = work / "ccfm"
    adapt_to_files(
        load_adaptable(ModelSpec("ccfm", out / "model.pt", device="cpu")),
        AdaptInputs(work / "processed.h5ad", work / "target_processed.h5ad"),
        ShiftFiles(out / "shift.safetensors", out / "mmd.tsv", out / "history.tsv"),
        AdaptSettings(**CCFM_ADAPT),
        seed=SEED,
    )


STAGE_FUNCTIONS: dict[str, Callable[[Path], None]] = {
    "preprocess": _preprocess,
    "preprocess_target": _preprocess_target,
    "split": _split,
    "calibration": _calibration,
    "baseline": _baseline,
    "adaptation": _adaptation,
    "train": _train,
    "predict": _predict,
    "adapt_model": _adapt_model,
}
STAGES = tuple(STAGE_FUNCTIONS)
STAGE_MODULES = (
    "torch",
    "ccfm.adapt.shift",
    "ccfm.adapt.files",
    "ccfm.adapt.target",
    "ccfm.adapt.score",
    "ccfm.evaluate.baselines",
    "ccfm.scgpt.calibration",
    "ccfm.scgpt.extractor",
    "ccfm.model.generation",
    "ccfm.data.preprocess",
    "ccfm.data.splits",
    "ccfm.model.training",
)
# What each stage writes, relative to the size's work directory.
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "preprocess": ("processed.h5ad",),
    "preprocess_target": ("target_processed.h5ad",),
    "split": ("real.h5ad", "split.json"),
    "calibration": ("latent_stats.pt",),
    "baseline": ("pred.h5ad", "pred_means.csv"),
    "adaptation": (),
    "train": ("ccfm/model.pt", "ccfm/loss.tsv"),
    "predict": ("ccfm/pred.h5ad", "ccfm/pred_means.csv"),
    "adapt_model": ("ccfm/shift.safetensors", "ccfm/mmd.tsv", "ccfm/history.tsv"),
}


def run_stage_here(stage: str, work: Path) -> dict[str, float]:
    """Run one stage in this (fresh) process and return its report."""
    # Every stage's libraries are imported before the first reading, so import_rss_mb is the
    # same for all stages and peak - import is the stage's own memory.
    for module in STAGE_MODULES:
        importlib.import_module(module)
    import torch

    torch.set_num_threads(1)
    return report_work(lambda: STAGE_FUNCTIONS[stage](work))


def output_mb(stage: str, work: Path) -> float:
    """Size on disk of what ``stage`` wrote."""
    return sum((work / name).stat().st_size for name in STAGE_OUTPUTS[stage]) / 2**20


def csr_x_mb(h5ad: Path) -> float:
    """In-memory size of the file's X as a CSR matrix (data + indices + indptr, stored dtypes)."""
    import h5py

    with h5py.File(h5ad, "r") as file:
        return (
            sum(file["X"][name].size * file["X"][name].dtype.itemsize for name in ("data", "indices", "indptr")) / 2**20
        )


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    """Write the result table as TSV, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    pd.DataFrame(rows).to_csv(tmp, sep="\t", index=False, float_format="%.1f")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, nargs="+", default=[50000, 200000])
    parser.add_argument("--genes", type=int, default=5000)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=3, help="child runs per stage and size (median reported)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ccfm-memory-scaling"))
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "memory_scaling.tsv")
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print_report(run_stage_here(args.child, args.workdir))
        return
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {STAGES}")
    rows: list[dict[str, Any]] = []
    for n_cells in args.cells:
        work = args.workdir / f"cells{n_cells}"
        work.mkdir(parents=True, exist_ok=True)
        raw = work / "raw.h5ad"
        if not raw.exists():
            t0 = time.perf_counter()
            write_synthetic(raw, n_cells, args.genes, args.density, SEED)
            print(
                f"generated {raw} ({raw.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
        for stage in stages:
            command = python_child(__file__, "--child", stage, "--workdir", str(work))
            reports = pd.DataFrame([run_child(command, f"stage {stage} in {work}") for _ in range(args.repeats)])
            peaks = reports["peak_rss_mb"]
            row = {
                "stage": stage,
                "cells": n_cells,
                "genes": args.genes,
                "repeats": args.repeats,
                "peak_rss_mb": peaks.median(),
                "peak_rss_min_mb": peaks.min(),
                "peak_rss_max_mb": peaks.max(),
                "import_rss_mb": reports["import_rss_mb"].median(),
                "wall_s": reports["wall_s"].median(),
                "output_mb": output_mb(stage, work),
                "processed_x_mb": csr_x_mb(work / "processed.h5ad"),
            }
            rows.append(row)
            print("\t".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()), flush=True)
            write_table(rows, args.out)
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.1f}"))


if __name__ == "__main__":
    main()
