"""Does the MMD adapter reach CCFM's target cells? Adapted vs unadapted, re-centring on and off.

With ``generate.recenter: true`` an anchored model's target cells are re-centred on the target
controls' own mean plus the mean model's predicted shift, whatever controls the flow started
from: the adapter can then only change the cells' spread and shape, not their mean. With
``false`` the flow's own mean stands, so a shift of the controls the flow starts from moves the
prediction. This script measures both on a finished demo run (``make demo`` first) and writes
``benchmarks/results/adapt_recenter.md``:

    python benchmarks/adapt_recenter.py [--run .] [--fold 1] [--out benchmarks/results/adapt_recenter.md]

Per mode: the target summary's MSE, Pearson delta, energy distance, std ratio and challenge
score of ``ccfm_adapted`` and ``ccfm_unadapted`` beside the target baselines, and the mean
absolute difference between adapted and unadapted predicted means.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))

from ccfm.adapt.ccfm_model import CCFMAdaptable  # noqa: E402
from ccfm.adapt.score import TargetScoreFiles, TargetScoreSettings, score_target_to_files  # noqa: E402
from ccfm.adapt.target import TargetPredictionFiles, predict_target_to_files  # noqa: E402
from ccfm.config import dataset_section  # noqa: E402
from ccfm.model.generation import prepare_generation  # noqa: E402

COLUMNS = ["mse", "pearson_delta_pseudobulk", "energy_distance", "std_ratio", "vcc_score"]


def run_mode(run: Path, fold: int, recenter: bool, work: Path, config: dict) -> tuple[pd.DataFrame, float]:
    generate = {**dataset_section(config, "demo", "generate"), "recenter": recenter}
    setup = prepare_generation(run / f"results/demo/fold{fold}/ccfm/model.pt", generate, threads=1, device="cpu")
    adapt = run / f"results/demo/fold{fold}/adapt"
    paths = {name: work / f"{name}.h5ad" for name in ("adapted", "unadapted")}
    predict_target_to_files(
        CCFMAdaptable.from_generation(setup),
        run / "results/demo/target_processed.h5ad",
        adapt / "shift.safetensors",
        TargetPredictionFiles(
            paths["adapted"], work / "adapted_means.csv", paths["unadapted"], work / "unadapted_means.csv"
        ),
        seed=int(config["seed"]),
    )
    summary = score_target_to_files(
        TargetScoreFiles(
            run / "results/demo/target_processed.h5ad",
            run / "results/demo/processed.h5ad",
            paths["adapted"],
            paths["unadapted"],
            work / "metrics.tsv",
            work / "summary.tsv",
        ),
        TargetScoreSettings(n_cells=int(generate["cells_per_perturbation"]), seed=int(config["seed"])),
    )
    adapted = pd.read_csv(work / "adapted_means.csv", index_col=0)
    unadapted = pd.read_csv(work / "unadapted_means.csv", index_col=0).loc[adapted.index]
    return summary, float(np.abs(adapted.to_numpy() - unadapted.to_numpy()).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=REPO, help="directory of a finished `make demo`")
    parser.add_argument("--fold", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    config = yaml.safe_load((args.run / "config/config.yaml").read_text())
    parts = []
    for recenter in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            summary, gap = run_mode(args.run, args.fold, recenter, Path(tmp), config)
        table = summary.set_index("method")[[c for c in COLUMNS if c in summary.columns]]
        parts.append(
            f"### `generate.recenter: {str(recenter).lower()}`\n\n{table.round(4).to_markdown()}\n\n"
            f"Mean |adapted − unadapted| of the predicted means: {gap:.2e} (log1p units).\n"
        )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    text = (
        f"`python benchmarks/adapt_recenter.py` at commit {commit.stdout.strip() or 'unknown'} on the demo's "
        f"target context (fold {args.fold}; the model, shift and target files of a finished `make demo`).\n\n"
        + "\n".join(parts)
    )
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
