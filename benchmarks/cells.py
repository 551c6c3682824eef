"""Generated cells, measured as cells: CCFM's flow variants beside the baselines and a real-vs-real floor.

Every variant trains on the same simulated pathway screen, split and seed as
``benchmarks/quality.py`` (same screen, same helpers); the table is averaged over seeds. Run
from the repository root:

    python benchmarks/cells.py                         # 3 seeds, every section (~1 h on 2 cores)
    python benchmarks/cells.py --seeds 1 --sections variants
    python benchmarks/cells.py --out benchmarks/results/cells.md

Sections (``--sections``):

- ``variants``: the flow's coupling, one change at a time: ``old`` (the network sees the very
  control cell the flow starts from, independent pairs: the coupling whose optimum is the
  condition mean), ``separate`` (the network sees another control cell), ``default``
  (separate + minibatch-OT pairs: ``ccfm_nolatent``), ``cascade`` (the default with the scGPT
  latent stream: ``ccfm``). Each with re-centring on the mean model on and off, and the
  default's cells moved onto the simulated world's expected means (``on oracle means``: what is
  left is the flow's own error, the rest is the mean model's).
- ``sampler``: the default model generated with Euler × 4, midpoint × 6 (the demo's) and rk4 × 20
  (the plan's), cells/s beside.
- ``cascade``: stage 2 of the cascade model with (a) the true held-out cells' latents
  (teacher-forced), (b) generated latents, (c) the true latents shuffled across cells gene by
  gene, beside (d) the no-latent model. The tiny scGPT has random weights: it carries no
  pretrained knowledge, so this measures the cascade's mechanics, not scGPT's value.
- ``steps``: the default model at three training lengths (``--step-grid``), each generated with
  Euler × 4 and with midpoint × 6.

Every other generation uses the demo's sampler, midpoint × 6.

Per method (held-out doubles, ``--cells`` generated cells per perturbation): MSE of the mean,
Euclidean energy distance, RBF MMD² and its floor (PCA space fitted on real training cells),
the std ratio, the correlation error on the top-20 DE genes beside its floor, and cell-eval's
``overlap_at_N``, ``discrimination_score_l1`` and ``de_spearman_sig`` (profile ``vcc`` plus DE;
``--no-celleval`` skips them).
"""

from __future__ import annotations

import argparse
import logging
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))
sys.path.insert(0, str(REPO / "benchmarks"))

import quality  # noqa: E402  (the screen, its fold and the tiny scGPT set-up)

from ccfm import CONTROL_LABEL, PERT_COLUMN  # noqa: E402
from ccfm.evaluate.baselines import BaselineOptions, run_baseline  # noqa: E402
from ccfm.evaluate.cells import CELL_COLUMNS  # noqa: E402
from ccfm.evaluate.metrics import compact_metrics, training_cells  # noqa: E402
from ccfm.io.predictions import write_predictions  # noqa: E402
from ccfm.model.denoiser import FlowStart, Integration  # noqa: E402
from ccfm.model.generation import (  # noqa: E402
    controls_mean,
    label_seed,
    predict_to_files,
    prepare_generation,
    read_control_cells,
)
from ccfm.model.mean_model import match_mean  # noqa: E402
from ccfm.model.training import TrainRequest, train_from_files  # noqa: E402

log = logging.getLogger("cells")

# The demo's model size: the whole benchmark must fit a 2-core machine.
MODEL = {"d_model": 32, "nhead": 2, "nlayers": 2, "bottleneck": 32, "dh_depth": 1}
TRAIN = {**quality.TRAIN, "batch_size": 16, "warmup_steps": 20}
# Samplers (time points per stage). The demo's midpoint x 6 (10 network evaluations) gives the
# cells of the plan's rk4 x 20 (80 evaluations); Euler x 4 (3 evaluations) contracts them, and
# more so the longer the model trained (sections ``sampler`` and ``steps``).
EULER4 = {"method": "euler", "latent_steps": 4, "expr_steps": 4}
DEMO = {"method": "midpoint", "latent_steps": 6, "expr_steps": 6}
PLAN = {"method": "rk4", "latent_steps": 20, "expr_steps": 20}
SAMPLERS = {"euler x4": EULER4, "midpoint x6": DEMO, "rk4 x20": PLAN}
# variant -> (train-section overrides, uses the scGPT latent)
VARIANTS = {
    "old": ({"condition_cell": "start", "coupling": "independent"}, False),
    "separate": ({"condition_cell": "separate", "coupling": "independent"}, False),
    "default": ({"condition_cell": "separate", "coupling": "ot"}, False),
    "cascade": ({"condition_cell": "separate", "coupling": "ot"}, True),
}
CELLEVAL_COLUMNS = ("overlap_at_N", "discrimination_score_l1", "de_spearman_sig")
SECTIONS = ("variants", "sampler", "cascade", "steps")


def train(fold: quality.Fold, work: Path, name: str, steps: int, seed: int, latent: dict | None) -> Path:
    overrides, use_latent = VARIANTS[name]
    model_pt = work / f"{name}_{steps}" / "model.pt"
    train_from_files(
        TrainRequest(
            processed_h5ad=fold.processed,
            split_json=fold.split_json,
            out_model=model_pt,
            out_loss=model_pt.with_name("loss.tsv"),
            resume_dir=model_pt.with_name("resume"),
            model_section=MODEL,
            train_section={**TRAIN, **quality.LATENT_TRAIN, **overrides, "steps": steps},
            latent_section=quality.LATENT,
            seed=seed,
            use_latent=use_latent,
            **(latent if use_latent else {}),
        ),
        device="cpu",
        progress=False,
    )
    return model_pt


def generate(model_pt: Path, fold: quality.Fold, out: Path, cells: int, seed: int, **generate) -> float:
    """Predict the fold's held-out doubles into ``out``; return cells/s."""
    setup = prepare_generation(model_pt, {**generate, "cells_per_perturbation": cells}, device="cpu")
    timing = predict_to_files(setup, fold.processed, fold.split_json, [], out, out.with_suffix(".csv"), seed=seed)
    return timing["cells_per_second"]


def score(pred_h5ad: Path, real: ad.AnnData, reference: ad.AnnData, seed: int, celleval: bool) -> dict[str, float]:
    """Mean over the held-out doubles of the compact + cell metrics and cell-eval's DE metrics."""
    pred = ad.read_h5ad(pred_h5ad)
    compact = compact_metrics(pred, real, CONTROL_LABEL, top_de=20, seed=seed, pca_reference=reference)
    row = {c: float(compact[c].mean()) for c in compact.columns if c not in ("perturbation", "top_de")}
    if celleval:
        from ccfm.evaluate.celleval import run_cell_eval

        results, _ = run_cell_eval(pred, real.copy(), CONTROL_LABEL, "full", 1)
        for column in CELLEVAL_COLUMNS:
            if column in results.columns:
                row[column] = float(pd.to_numeric(results[column], errors="coerce").mean())
    return row


def teacher_forced(
    model_pt: Path, fold: quality.Fold, latent: dict, out: Path, cells: int, seed: int, mode: str
) -> None:
    """Stage 2 of the cascade from the real held-out cells' latents (``mode`` "true" or "shuffled")."""
    from ccfm.io.h5ad import read_var
    from ccfm.scgpt.calibration import LatentStats
    from ccfm.scgpt.extractor import ExtractorSettings, ScGPTFeatureExtractor
    from ccfm.scgpt.vocab import read_gene_vocab, vocab_id_array

    setup = prepare_generation(model_pt, {**DEMO, "cells_per_perturbation": cells}, device="cpu")
    model = setup.model
    mapping = read_gene_vocab(latent["gene_vocab_tsv"])
    assert list(mapping["gene"]) == list(read_var(fold.processed).index)
    extractor = ScGPTFeatureExtractor(
        latent["scgpt_dir"],
        vocab_id_array(mapping),
        "cpu",
        settings=ExtractorSettings(
            max_tokens_per_cell=quality.LATENT["max_tokens_per_cell"],
            seed=seed,
            zero_tokens=quality.LATENT["zero_tokens"],
        ),
    )
    stats = LatentStats.load(latent["latent_stats"])
    controls = read_control_cells(fold.processed)
    control_rows = np.arange(controls.matrix.shape[0])
    reference = controls_mean(controls, control_rows)
    real = ad.read_h5ad(fold.real)
    labels = real.obs[PERT_COLUMN].astype(str).to_numpy()
    predicted = {}
    genes = torch.arange(controls.n_genes)
    for label in fold.test:
        x1 = np.asarray(real.X[labels == label].toarray(), dtype=np.float32)[:cells]
        expr = torch.from_numpy(x1)
        z = stats.normalize(extractor.extract(expr), extractor.covered_mask(expr)).float()
        rng = np.random.default_rng(label_seed(seed, label))
        if mode == "shuffled":  # each gene's latent from another cell: marginals kept, cells broken
            for g in range(z.shape[1]):
                z[:, g] = z[torch.from_numpy(rng.permutation(z.shape[0])), g]
        n = z.shape[0]
        starts = rng.choice(control_rows, size=n)
        conditions = rng.choice(control_rows, size=n)
        shift = model.mean_model.delta(label)
        x_start = torch.from_numpy(controls.dense_rows(starts)) + shift
        source = torch.from_numpy(controls.dense_rows(conditions))
        generator = torch.Generator().manual_seed(seed)
        cells_out, _ = model.denoiser.generate(
            genes.expand(n, -1),
            source,
            model.vocab.batch_ids([label]).expand(n, -1),
            Integration(expr_steps=DEMO["expr_steps"], method=DEMO["method"]),
            FlowStart(generator, x_start=x_start),
            latent=z,
        )
        predicted[label] = match_mean(cells_out.numpy(), reference + shift.numpy())
    write_predictions(out, out.with_suffix(".csv"), controls.genes, predicted, controls.matrix, CONTROL_LABEL)


def on_oracle_means(pred_h5ad: Path, fold: quality.Fold, out: Path) -> None:
    """The prediction's cells moved, label by label, onto the simulated world's expected means.

    Keeps the generated cells' spread and shape and removes the mean model's error: what is
    left of the distance to the real cells is the flow's own (clipped at 0, as every prediction).
    """
    pred = ad.read_h5ad(pred_h5ad)
    labels = pred.obs[PERT_COLUMN].astype(str).to_numpy()
    matrix = pred.X.toarray() if hasattr(pred.X, "toarray") else np.asarray(pred.X)
    predicted = {
        label: np.clip(matrix[labels == label] - matrix[labels == label].mean(axis=0) + fold.oracle[label], 0, None)
        for label in fold.test
    }
    write_predictions(out, out.with_suffix(".csv"), list(pred.var_names), predicted, matrix[labels == CONTROL_LABEL])


def run_seed(seed: int, args: argparse.Namespace, work: Path) -> list[dict]:
    fold = quality.prepare_fold(work, seed)
    real = ad.read_h5ad(fold.real)
    reference = training_cells(str(fold.processed), str(fold.split_json), seed=seed)
    rows: list[dict] = []

    def add(section: str, method: str, pred: Path, **extra: float) -> None:
        started = time.perf_counter()
        row = {"seed": seed, "section": section, "method": method, **score(pred, real, reference, seed, args.celleval)}
        rows.append({**row, **extra})
        log.info("seed %d %s/%s scored in %.0f s", seed, section, method, time.perf_counter() - started)

    for method in ("nochange", "additive"):
        out = work / f"{method}.h5ad"
        run_baseline(
            method, fold.processed, fold.split_json, fold.real, out, out.with_suffix(".csv"),
            BaselineOptions(cells_per_perturbation=args.cells, seed=seed),
        )  # fmt: skip
        for section in args.sections:
            if section != "steps":
                add(section, method, out)
    needs_latent = {"variants", "cascade"} & set(args.sections)
    latent = quality.latent_inputs(work, fold, seed) if needs_latent else None
    models: dict[str, Path] = {}

    def model(name: str, steps: int = args.steps) -> Path:
        key = f"{name}_{steps}"
        if key not in models:
            started = time.perf_counter()
            models[key] = train(fold, work, name, steps, seed, latent)
            log.info("seed %d trained %s in %.0f s", seed, key, time.perf_counter() - started)
        return models[key]

    if "variants" in args.sections:
        for name in args.variants:
            for recenter in (True, False):
                out = work / f"{name}_rc{int(recenter)}.h5ad"
                speed = generate(model(name), fold, out, args.cells, seed, **DEMO, recenter=recenter)
                add("variants", f"{name}{'' if recenter else ' (recenter off)'}", out, cells_per_s=speed)
                if name == "default" and recenter:
                    oracle = work / "default_oracle.h5ad"
                    on_oracle_means(out, fold, oracle)
                    add("variants", "default, on oracle means", oracle)
    if "sampler" in args.sections:
        for label, sampler in SAMPLERS.items():
            out = work / f"sampler_{label.replace(' ', '')}.h5ad"
            speed = generate(model("default"), fold, out, args.cells, seed, **sampler)
            add("sampler", f"default, {label}", out, cells_per_s=speed)
    if "cascade" in args.sections:
        for mode in ("true", "shuffled"):
            out = work / f"cascade_{mode}.h5ad"
            teacher_forced(model("cascade"), fold, latent, out, args.cells, seed, mode)
            add("cascade", "(a) teacher-forced latents" if mode == "true" else "(c) shuffled latents", out)
        out = work / "cascade_generated.h5ad"
        generate(model("cascade"), fold, out, args.cells, seed, **DEMO)
        add("cascade", "(b) generated latents", out)
        out = work / "cascade_none.h5ad"
        generate(model("default"), fold, out, args.cells, seed, **DEMO)
        add("cascade", "(d) no latent (ccfm_nolatent)", out)
    if "steps" in args.sections:
        for method in ("nochange", "additive"):
            add("steps", method, work / f"{method}.h5ad")
        for steps in args.step_grid:
            for label in ("euler x4", "midpoint x6"):
                out = work / f"steps_{steps}_{label.replace(' ', '')}.h5ad"
                generate(model("default", steps), fold, out, args.cells, seed, **SAMPLERS[label])
                add("steps", f"default, {steps} steps, {label}", out)
    return rows


def summarise(rows: pd.DataFrame) -> str:
    """Markdown: one table per section, mean ± SD over seeds of the per-seed means."""
    metrics = ["mse", *CELL_COLUMNS, *CELLEVAL_COLUMNS, "cells_per_s"]
    parts = []
    for section, group in rows.groupby("section", sort=False):
        order = list(dict.fromkeys(group.method))
        columns = [m for m in metrics if m in group and group[m].notna().any()]
        stats = group.groupby("method", sort=False)[columns].agg(["mean", "std"])
        table = pd.DataFrame(index=order)
        table["seeds"] = [int(group.loc[group.method == m, "seed"].nunique()) for m in order]
        for column in columns:
            table[column] = [
                f"{stats.loc[m, (column, 'mean')]:.3f} ± {np.nan_to_num(stats.loc[m, (column, 'std')]):.3f}"
                if np.isfinite(stats.loc[m, (column, "mean")])
                else ""
                for m in order
            ]
        parts.append(f"### {section}\n\n" + table.to_markdown())
    return "\n\n".join(parts)


def merge(tsvs: list[Path], out: Path | None) -> None:
    """One summary of several runs' rows; the header lists each run's own header line."""
    rows = pd.concat([pd.read_csv(path, sep="\t") for path in tsvs], ignore_index=True)
    headers = [path.with_suffix(".md").read_text().split("\n\n", 1)[0] for path in tsvs]
    text = "Merged from runs:\n\n" + "\n".join(f"- {h}" for h in headers) + "\n\n" + summarise(rows) + "\n"
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        rows.to_csv(out.with_suffix(".tsv"), sep="\t", index=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--step-grid", type=int, nargs="+", default=[150, 600, 2000])
    parser.add_argument("--cells", type=int, default=64, help="generated cells per perturbation")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--no-celleval", dest="celleval", action="store_false")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown tables here (and a .tsv of rows)")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="instead of running: summarise the row files (.tsv) of earlier runs, e.g. one per seed",
    )
    args = parser.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("ccfm", "anndata", "scanpy", "cell_eval", "pdex"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows: list[dict] = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            rows += run_seed(seed, args, Path(tmp))
    table = pd.DataFrame(rows)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    header = (
        f"`python benchmarks/cells.py {' '.join(argv if argv is not None else sys.argv[1:])}` at commit "
        f"{commit.stdout.strip() or 'unknown'}: seeds {args.seeds}, {args.steps} training steps (d_model "
        f"{MODEL['d_model']}, batch {TRAIN['batch_size']}), {args.cells} generated cells per held-out double of "
        f"the pathway screen; {(time.perf_counter() - started) / 60:.1f} min on "
        f"{platform.processor() or platform.machine()} with {args.threads} torch threads. Mean ± SD over seeds. "
        "Floors: the same metric between two random halves of the real cells (the method is scored "
        "against one half with as many cells as the other has)."
    )
    text = header + "\n\n" + summarise(table) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        table.to_csv(args.out.with_suffix(".tsv"), sep="\t", index=False)


if __name__ == "__main__":
    main()
