"""Prediction quality of CCFM variants beside baselines, a noise floor and the simulator's oracle.

Every variant trains on the same simulated pathway screen, split and seed; the table is averaged
over several seeds (one simulation + split + training per seed). Run from the repository root:

    python benchmarks/quality.py                       # 3 seeds, the default variants (~20 min, 2 cores)
    python benchmarks/quality.py --seeds 1 --steps 100 # a quick look
    python benchmarks/quality.py --out benchmarks/results/quality.md

Per variant, on the held-out doubles (pseudobulk of ``--cells`` generated cells per perturbation):
MSE, DEG-weighted MSE (gene weights |observed delta|), per-perturbation MSE relative to the
additive baseline (median ratio, share of doubles where the method beats additive), Pearson delta
over all genes and the top-20 DE genes, E-distance (50 PCs of the real cells), and training cells/s.

Reference rows: ``nochange`` and ``additive`` (the pipeline's baselines: shifted control cells),
``additive_means`` (control mean + Σ single deltas on the means, no cell clamping), the
``noise_floor`` (MSE a perfect mean would score: a quarter of the split-half MSE of the real
cells) and ``oracle`` (the simulator's true mean, Monte-Carlo estimated from 4,000 fresh cells).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))

from ccfm import CONTROL_LABEL  # noqa: E402
from ccfm.data.preprocess import PreprocessSettings, preprocess_dataset  # noqa: E402
from ccfm.data.simulate import SimulationSizes, build_world, expected_log1p_mean, simulate_demo  # noqa: E402
from ccfm.data.splits import split_for_processed, write_real, write_split  # noqa: E402
from ccfm.evaluate.baselines import BaselineOptions, run_baseline  # noqa: E402
from ccfm.evaluate.metrics import compact_metrics  # noqa: E402
from ccfm.model.generation import predict_to_files, prepare_generation  # noqa: E402
from ccfm.model.training import TrainRequest, train_from_files  # noqa: E402


def latent_inputs(work: Path, fold: Fold, seed: int) -> dict[str, Path]:
    """Tiny scGPT checkpoint, gene vocabulary map and the fold's calibrated feature statistics."""
    from ccfm.io.h5ad import read_var
    from ccfm.scgpt.calibration import calibrate, training_cell_indices
    from ccfm.scgpt.checkpoint import build_tiny_checkpoint, read_vocab
    from ccfm.scgpt.extractor import ExtractorSettings, ScGPTFeatureExtractor
    from ccfm.scgpt.vocab import map_genes, vocab_id_array, write_gene_vocab

    scgpt_dir = work / "scgpt_tiny"
    build_tiny_checkpoint(scgpt_dir, seed=seed, **TINY_SCGPT)
    var = read_var(fold.processed)
    mapping = map_genes(var.index.astype(str), read_vocab(scgpt_dir / "vocab.json"), var)
    write_gene_vocab(mapping, work / "gene_vocab.tsv")
    extractor = ScGPTFeatureExtractor(
        scgpt_dir,
        vocab_id_array(mapping),
        "cpu",
        settings=ExtractorSettings(
            max_tokens_per_cell=LATENT["max_tokens_per_cell"], seed=seed, zero_tokens=LATENT["zero_tokens"]
        ),
    )
    stats = calibrate(
        extractor,
        fold.processed,
        training_cell_indices(fold.processed, fold.split_json),
        batch_size=32,
        max_cells=1000,
        seed=seed,
        target_std=LATENT["target_std"],
        genes=list(mapping["gene"]),
    )
    stats.save(work / "latent_stats.pt")
    return {"scgpt_dir": scgpt_dir, "gene_vocab_tsv": work / "gene_vocab.tsv", "latent_stats": work / "latent_stats.pt"}


log = logging.getLogger("quality")

# The pathway screen: interactions follow modules, larger than the demo so that pair-level
# structure can be learned from the training doubles (Norman 2019 has ~130 doubles).
SCREEN = dict(
    n_genes=200,
    n_real_symbols=150,
    n_singles=24,
    n_doubles=72,
    n_modules=8,
    n_control_cells=1500,
    cells_per_condition=150,
    n_target_control_cells=10,
    n_target_singles=1,
    n_target_doubles=1,
    target_cells_per_condition=10,
)
MODEL = {"d_model": 64, "nhead": 4, "nlayers": 2, "dh_depth": 1}
TRAIN = {
    "batch_size": 32,
    "lr": 1e-3,
    "warmup_steps": 30,
    "checkpoint_every": 100000,
    "log_every": 50,
    "infer_top_gene": 100,
    "gpus": 0,
}
# Euler with 4 time points: the anchored flow starts next to its target, and 128 cells x 300 genes
# per network evaluation cost ~1.7 s on one CPU thread.
GENERATE = {"method": "euler", "latent_steps": 4, "expr_steps": 4}
# variant -> model-section overrides (one change at a time from the row above it).
VARIANTS = {
    "plain": {"anchor": "none"},  # the plan's Gaussian-source flow
    "anchored": {"anchor": "additive", "interaction": "off"},  # control-anchored flow on the additive mean
    "anchored+network": {"anchor": "additive", "interaction": "network"},
    "anchored+kernel": {"anchor": "additive", "interaction": "kernel"},  # the default, ccfm_nolatent
    "cascade": {"anchor": "additive", "interaction": "kernel"},  # the default with the scGPT latent stream (ccfm)
}
LATENT_VARIANTS = {"cascade"}
# The demo's tiny scGPT (random weights, real vocabulary) and latent settings.
TINY_SCGPT = {"embsize": 32, "nlayers": 2, "nheads": 4, "d_hid": 64}
LATENT = {"max_tokens_per_cell": 1200, "zero_tokens": True, "cache": "off", "target_std": 1.0}
LATENT_TRAIN = {"latent_weight": 0.33, "stage2_noised": True, "noised_low": 0.75, "choose_latent_p": 0.4}


@dataclass
class Fold:
    processed: Path
    split_json: Path
    real: Path
    test: list[str]
    oracle: dict[str, np.ndarray]


def prepare_fold(work: Path, seed: int) -> Fold:
    """Simulate, preprocess and split one screen; the oracle means come from the same world."""
    paths = simulate_demo(work / "sim", seed=seed, **SCREEN)
    processed = work / "processed.h5ad"
    preprocess_dataset(
        paths["raw"],
        processed,
        PreprocessSettings(dataset="quality", input_scale="counts", n_top_genes=SCREEN["n_genes"]),
    )
    split = split_for_processed(processed, fold=1, seed=seed, heldout_fraction=0.3, n_folds=5)
    split_json, real = work / "fold1.json", work / "real.h5ad"
    write_real(processed, split, real)
    write_split(split, split_json)
    world = build_world(SimulationSizes(**SCREEN), np.random.default_rng(seed))  # simulate_demo's first draws
    rng = np.random.default_rng(seed + 1000)
    genes = list(ad.read_h5ad(processed, backed="r").var_names)
    order = [list(world.genes).index(g) for g in genes]
    oracle = {}
    for name, shift in zip(world.conditions, world.shifts):
        if name in split["test"]:
            mean = expected_log1p_mean(world, shift, n_cells=4000, library_mean=1500.0, rng=rng)
            oracle[name] = mean[order]
    return Fold(processed, split_json, real, list(split["test"]), oracle)


def pseudobulk_rows(pred: ad.AnnData, real: ad.AnnData, fold: Fold, method: str, seed: int) -> list[dict]:
    """Per held-out double: compact metrics plus DEG-weighted MSE."""
    compact = compact_metrics(pred, real, CONTROL_LABEL, top_de=20, seed=seed).set_index("perturbation")
    real_labels = real.obs["target_gene"].astype(str).to_numpy()
    pred_labels = pred.obs["target_gene"].astype(str).to_numpy()
    control = np.asarray(real.X[real_labels == CONTROL_LABEL].mean(axis=0)).ravel()
    rows = []
    for label in fold.test:
        observed = np.asarray(real.X[real_labels == label].mean(axis=0)).ravel()
        predicted = np.asarray(pred.X[pred_labels == label].mean(axis=0)).ravel()
        weights = np.abs(observed - control)
        err = (predicted - observed) ** 2
        rows.append(
            {
                "seed": seed,
                "method": method,
                "perturbation": label,
                "mse": float(err.mean()),
                "mse_deg": float((weights * err).sum() / max(weights.sum(), 1e-12)),
                **{
                    k: float(compact.loc[label, k])
                    for k in ("pearson_delta_pseudobulk", "pearson_delta_top_de", "edistance")
                },
            }
        )
    return rows


def reference_rows(fold: Fold, real: ad.AnnData, seed: int) -> list[dict]:
    """additive_means, noise floor and oracle rows (mean-level predictors: no cells, no E-distance)."""
    labels = real.obs["target_gene"].astype(str).to_numpy()
    processed = ad.read_h5ad(fold.processed)
    p_labels = processed.obs["target_gene"].astype(str).to_numpy()

    def mean_of(matrix, mask):
        return np.asarray(matrix[mask].mean(axis=0)).ravel()

    control = mean_of(processed.X, p_labels == CONTROL_LABEL)
    rng = np.random.default_rng(seed)
    rows = []
    for label in fold.test:
        cells = np.flatnonzero(labels == label)
        observed = mean_of(real.X, labels == label)
        a, b = label.split("+")
        additive = mean_of(processed.X, p_labels == a) + mean_of(processed.X, p_labels == b) - control
        halves = rng.permutation(cells)
        split_half = np.mean(
            (mean_of(real.X, halves[: cells.size // 2]) - mean_of(real.X, halves[cells.size // 2 :])) ** 2
        )
        weights = np.abs(observed - control)
        for method, predicted in (("additive_means", additive), ("oracle", fold.oracle[label])):
            err = (predicted - observed) ** 2
            rows.append(
                {
                    "seed": seed,
                    "method": method,
                    "perturbation": label,
                    "mse": float(err.mean()),
                    "mse_deg": float((weights * err).sum() / weights.sum()),
                    "pearson_delta": float(np.corrcoef(predicted - control, observed - control)[0, 1]),
                }
            )
        rows.append({"seed": seed, "method": "noise_floor", "perturbation": label, "mse": float(split_half / 4)})
    return rows


def run_seed(seed: int, steps: int, cells: int, variants: list[str], work: Path) -> tuple[list[dict], dict[str, float]]:
    fold = prepare_fold(work, seed)
    real = ad.read_h5ad(fold.real)
    rows = reference_rows(fold, real, seed)
    for method in ("nochange", "additive"):
        out = work / f"{method}.h5ad"
        run_baseline(
            method,
            fold.processed,
            fold.split_json,
            fold.real,
            out,
            work / f"{method}.csv",
            BaselineOptions(cells_per_perturbation=cells, seed=seed),
        )
        rows += pseudobulk_rows(ad.read_h5ad(out), real, fold, method, seed)
    speed = {}
    latent = latent_inputs(work, fold, seed) if LATENT_VARIANTS & set(variants) else {}
    for name in variants:
        model_pt = work / name / "model.pt"
        started = time.perf_counter()
        use_latent = name in LATENT_VARIANTS
        result = train_from_files(
            TrainRequest(
                processed_h5ad=fold.processed,
                split_json=fold.split_json,
                out_model=model_pt,
                out_loss=work / name / "loss.tsv",
                resume_dir=work / name / "resume",
                model_section={**MODEL, **VARIANTS[name]},
                train_section={**TRAIN, **LATENT_TRAIN, "steps": steps},
                latent_section=LATENT,
                seed=seed,
                use_latent=use_latent,
                **(latent if use_latent else {}),
            ),
            device="cpu",
            progress=False,
        )
        speed[name] = steps * TRAIN["batch_size"] / max(result.seconds, 1e-9)
        generation = prepare_generation(model_pt, {**GENERATE, "cells_per_perturbation": cells}, device="cpu")
        predict_to_files(
            generation,
            fold.processed,
            fold.split_json,
            [],
            work / name / "pred.h5ad",
            work / name / "pred.csv",
            seed=seed,
        )
        rows += pseudobulk_rows(ad.read_h5ad(work / name / "pred.h5ad"), real, fold, name, seed)
        log.info("seed %d %s: %.0f s", seed, name, time.perf_counter() - started)
    return rows, speed


def summarise(rows: pd.DataFrame, speed: dict[str, np.ndarray], reference: str = "additive") -> pd.DataFrame:
    """Mean ± SD over seeds of each method's per-seed means; ratios against ``reference``."""
    ref = rows[rows.method == reference].set_index(["seed", "perturbation"])["mse"]
    per_seed = []
    for (seed, method), group in rows.groupby(["seed", "method"], sort=False):
        keyed = group.set_index(["seed", "perturbation"])
        ratio = keyed["mse"] / ref.reindex(keyed.index)
        per_seed.append(
            {
                "seed": seed,
                "method": method,
                "mse": group.mse.mean(),
                "mse_deg": group["mse_deg"].mean() if "mse_deg" in group else np.nan,
                f"{reference}_over_method": np.nan,
                f"median_mse_vs_{reference}": ratio.median(),
                f"beats_{reference}": (ratio < 1).mean(),
                **{
                    k: group[k].mean() if k in group else np.nan
                    for k in ("pearson_delta_pseudobulk", "pearson_delta_top_de", "edistance")
                },
            }
        )
    per_seed = pd.DataFrame(per_seed)
    ref_mse = per_seed[per_seed.method == reference].set_index("seed")["mse"]
    per_seed[f"{reference}_over_method"] = ref_mse.reindex(per_seed.seed).to_numpy() / per_seed.mse.to_numpy()
    order = list(dict.fromkeys(per_seed.method))
    table = per_seed.drop(columns="seed").groupby("method", sort=False).agg(["mean", "std"])
    out = pd.DataFrame(index=order)
    for col in [c for c in per_seed.columns if c not in ("seed", "method")]:
        out[col] = [
            f"{table.loc[m, (col, 'mean')]:.4f} ± {table.loc[m, (col, 'std')]:.4f}"
            if np.isfinite(table.loc[m, (col, "mean")])
            else ""
            for m in order
        ]
    out["train_cells_per_s"] = [f"{speed[m].mean():.0f}" if m in speed else "" for m in order]
    return out


# Real data (singles only): held-out single perturbations against no-change and mean-perturbation.
REAL = {
    "papalexi": ("papalexi2021_thp1_lowmoi_20729x299.h5ad", "target", "non-targeting"),
    "datlinger": ("datlinger2017_jurkat_cropseq_7500x2000.h5ad", "perturbation", "control"),
}
SHARED_REAL = REPO.parent / "shared" / "data" / "real"


def run_real_seed(
    name: str, seed: int, steps: int, cells: int, variants: list[str], work: Path
) -> tuple[list[dict], dict[str, float]]:
    """One split of a real singles-only screen: fold ``seed`` holds out 30% of the singles."""
    file, column, control = REAL[name]
    raw = SHARED_REAL / file
    if not raw.exists():
        raise SystemExit(f"{raw} is absent: the real datasets ship in ../shared beside a development clone")
    processed = work / "processed.h5ad"
    preprocess_dataset(
        raw,
        processed,
        PreprocessSettings(
            dataset=name, perturbation_column=column, control_label=control, input_scale="counts", n_top_genes=300
        ),
    )
    split = split_for_processed(processed, fold=seed, seed=42, heldout_fraction=0.3, n_folds=max(5, seed))
    split_json, real_path = work / "split.json", work / "real.h5ad"
    write_real(processed, split, real_path)
    write_split(split, split_json)
    fold = Fold(processed, split_json, real_path, list(split["test"]), {})
    real = ad.read_h5ad(real_path)
    labels = real.obs["target_gene"].astype(str).to_numpy()
    rows = []
    rng = np.random.default_rng(seed)
    for label in fold.test:
        cells_of = rng.permutation(np.flatnonzero(labels == label))
        half = cells_of.size // 2
        split_half = np.mean(
            (np.asarray(real.X[cells_of[:half]].mean(axis=0)) - np.asarray(real.X[cells_of[half:]].mean(axis=0))) ** 2
        )
        rows.append({"seed": seed, "method": "noise_floor", "perturbation": label, "mse": float(split_half / 4)})
    for method in ("nochange", "meanpert"):
        out = work / f"{method}.h5ad"
        run_baseline(
            method,
            processed,
            split_json,
            real_path,
            out,
            work / f"{method}.csv",
            BaselineOptions(cells_per_perturbation=cells, seed=seed),
        )
        rows += pseudobulk_rows(ad.read_h5ad(out), real, fold, method, seed)
    speed = {}
    for variant in variants:
        model_pt = work / variant / "model.pt"
        result = train_from_files(
            TrainRequest(
                processed_h5ad=processed,
                split_json=split_json,
                out_model=model_pt,
                out_loss=work / variant / "loss.tsv",
                resume_dir=work / variant / "resume",
                model_section={**MODEL, **VARIANTS[variant]},
                train_section={**TRAIN, "steps": steps, "infer_top_gene": 256},
                latent_section=LATENT,
                seed=seed,
                use_latent=False,
            ),
            device="cpu",
            progress=False,
        )
        speed[variant] = steps * TRAIN["batch_size"] / max(result.seconds, 1e-9)
        generation = prepare_generation(model_pt, {**GENERATE, "cells_per_perturbation": cells}, device="cpu")
        predict_to_files(
            generation, processed, split_json, [], work / variant / "pred.h5ad", work / variant / "pred.csv", seed=seed
        )
        rows += pseudobulk_rows(ad.read_h5ad(work / variant / "pred.h5ad"), real, fold, variant, seed)
    return rows, speed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--cells", type=int, default=128, help="generated cells per perturbation")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument(
        "--real",
        choices=sorted(REAL),
        default=None,
        help="a real singles-only screen from ../shared/data/real instead of the simulated one "
        "(held-out singles; seeds are folds)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("ccfm", "anndata", "scanpy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    all_rows, speeds = [], {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            if args.real:
                variants = [v for v in args.variants if v not in LATENT_VARIANTS]
                rows, speed = run_real_seed(args.real, seed, args.steps, args.cells, variants, Path(tmp))
            else:
                rows, speed = run_seed(seed, args.steps, args.cells, args.variants, Path(tmp))
        all_rows += rows
        for name, value in speed.items():
            speeds.setdefault(name, []).append(value)
    table = summarise(
        pd.DataFrame(all_rows),
        {k: np.asarray(v) for k, v in speeds.items()},
        reference="meanpert" if args.real else "additive",
    )
    minutes = (time.perf_counter() - started) / 60
    what = (
        f"held-out singles of {REAL[args.real][0]} (folds {args.seeds}, 30% of the singles each)"
        if args.real
        else f"held-out doubles of the pathway screen {json.dumps(SCREEN)}"
    )
    header = (
        f"Seeds {args.seeds}, {args.steps} training steps, {args.cells} generated cells per perturbation, "
        f"{what}; {minutes:.1f} min on "
        f"{platform.processor() or platform.machine()} with {args.threads} torch threads. Mean ± SD over seeds."
    )
    text = header + "\n\n" + table.to_markdown() + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        pd.DataFrame(all_rows).to_csv(args.out.with_suffix(".tsv"), sep="\t", index=False)


if __name__ == "__main__":
    main()
