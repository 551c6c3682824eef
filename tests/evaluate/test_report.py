"""Report figures draw what they claim, and the report checker catches broken reports.

The checker (tests/report_check.py, test tooling, not package code) is exercised on a real Snakemake report built from
a two-rule workflow in a scratch directory, and, when Debian's chromium is installed, in a real
headless browser.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import report_check
from ccfm.evaluate.plots import (
    PcaPanels,
    choose_perturbations,
    plot_delta_scatter,
    plot_gene_vocab_coverage,
    plot_loss_curves,
    plot_metric_comparison,
    plot_prediction_pca,
)

checker = report_check


def _assert_png_has_content(path: Path, min_width: int = 300) -> None:
    image = mpimg.imread(path)
    assert image.shape[1] >= min_width
    # Not a blank canvas: many distinct pixel values.
    assert np.unique(image.reshape(-1, image.shape[-1]), axis=0).shape[0] > 20


@pytest.fixture(scope="module")
def toy_real() -> ad.AnnData:
    rng = np.random.default_rng(0)
    blocks = {"non-targeting": 60, "A+B": 40, "C+D": 30, "E+F": 20}
    labels = [k for k, n in blocks.items() for _ in range(n)]
    x = rng.gamma(2.0, 0.5, size=(len(labels), 25))
    x[np.array(labels) == "A+B", :5] += 2.0
    obs = pd.DataFrame({"target_gene": labels}, index=[f"c{i}" for i in range(len(labels))])
    return ad.AnnData(
        X=sp.csr_matrix(x.astype(np.float32)), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(25)])
    )


def test_choose_perturbations_prefers_best_measured(toy_real):
    assert choose_perturbations(toy_real, 2) == ["A+B", "C+D"]


def _offsets(collection) -> np.ndarray:
    return np.asarray(collection.get_offsets(), dtype=np.float64)


def test_figures_are_drawn(tmp_path, toy_real, monkeypatch):
    """Each figure plots the data it is given: bar heights, points, line data, titles and labels."""
    from ccfm.evaluate import plots

    drawn: dict[str, object] = {}
    real_save = plots.save_figure

    def recording_save(fig, path, dpi=110):
        drawn[Path(path).name] = fig
        real_save(fig, path, dpi)

    monkeypatch.setattr(plots, "save_figure", recording_save)
    summary = pd.DataFrame(
        {
            "dataset": "demo",
            "method": ["nochange", "additive", "nochange", "additive", "nochange", "additive"],
            "fold": ["1", "1", "2", "2", "all", "all"],
            "pearson_delta_pseudobulk": [0.1, 0.6, 0.2, 0.7, 0.15, 0.65],
            "pearson_delta_top_de": [0.2, 0.8, 0.1, 0.9, 0.15, 0.85],
            "mse": [0.3, 0.1, 0.35, 0.12, 0.325, 0.11],
            "energy_distance": [5.0, 2.0, 6.0, 1.5, 5.5, 1.75],
        }
    )
    plot_metric_comparison(summary, tmp_path / "metrics.png", "demo")
    _assert_png_has_content(tmp_path / "metrics.png")
    metric_axes = [ax for ax in drawn["metrics.png"].axes if ax.patches]
    assert [ax.get_title().split("\n")[0] for ax in metric_axes] == [
        "pearson_delta_pseudobulk",
        "pearson_delta_top_de",
        "mse",
        "energy_distance",
    ]
    per_fold = summary[summary["fold"] != "all"]
    for ax in metric_axes:
        metric = ax.get_title().split("\n")[0]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["nochange", "additive"]
        for i, method in enumerate(["nochange", "additive"]):
            folds = per_fold.loc[per_fold["method"] == method, metric].to_numpy()
            assert ax.patches[i].get_height() == pytest.approx(folds.mean())  # bar: mean over folds
            np.testing.assert_allclose(_offsets(ax.collections[i]), np.c_[np.full(2, i), folds])  # dots: folds

    genes = list(toy_real.var_names)
    real_means = {
        p: np.asarray(toy_real[toy_real.obs["target_gene"] == p].X.mean(axis=0)).ravel() for p in ["A+B", "C+D", "E+F"]
    }
    pred_means = {
        "additive": pd.DataFrame(real_means, index=genes).T,
        "nochange": pd.DataFrame({p: np.full(25, 1.0) for p in real_means}, index=genes).T,
    }
    plot_delta_scatter(toy_real, pred_means, tmp_path / "delta.png", n_perturbations=2)
    _assert_png_has_content(tmp_path / "delta.png")
    control_mean = np.asarray(toy_real[toy_real.obs["target_gene"] == "non-targeting"].X.mean(axis=0)).ravel()
    panels = drawn["delta.png"].axes
    assert len(panels) == 4  # the two best-measured perturbations x two methods
    for ax, (pert, method) in zip(
        panels, [("A+B", "additive"), ("A+B", "nochange"), ("C+D", "additive"), ("C+D", "nochange")]
    ):
        observed = real_means[pert] - control_mean
        predicted = pred_means[method].loc[pert].to_numpy() - control_mean
        np.testing.assert_allclose(_offsets(ax.collections[0]), np.c_[observed, predicted], rtol=1e-5, atol=1e-6)
        r = np.corrcoef(observed, predicted)[0, 1]
        assert ax.get_title() == f"{pert} · {method}\nr = {r:.2f}"
    assert panels[0].get_title().endswith("r = 1.00")

    pred = toy_real[toy_real.obs["target_gene"].isin(["non-targeting", "A+B", "C+D", "E+F"])].copy()
    pred.X = sp.csr_matrix(pred.X.toarray() + 0.5 * (pred.obs["target_gene"] != "non-targeting").to_numpy()[:, None])
    plot_prediction_pca(pred, toy_real, tmp_path / "pca.png", "additive", PcaPanels(n_perturbations=3))
    _assert_png_has_content(tmp_path / "pca.png")
    pca_axes = [ax for ax in drawn["pca.png"].axes if ax.collections]
    assert [ax.get_title() for ax in pca_axes] == ["A+B", "C+D", "E+F"]
    from sklearn.decomposition import PCA

    def cells(adata: ad.AnnData, label: str) -> np.ndarray:
        return adata[adata.obs["target_gene"] == label].X.toarray().astype(np.float64)

    for ax, pert in zip(pca_axes, ["A+B", "C+D", "E+F"]):
        # Fewer cells than max_cells: every real control, real perturbed and predicted cell, projected
        # into the PCA of that perturbation's real cells and the real controls.
        groups = [cells(toy_real, "non-targeting"), cells(toy_real, pert), cells(pred, pert)]
        pca = PCA(n_components=2, random_state=0).fit(np.vstack(groups[:2]))
        assert len(ax.collections) == 3
        for collection, group in zip(ax.collections, groups):
            np.testing.assert_allclose(_offsets(collection), pca.transform(group), rtol=1e-6, atol=1e-9)
    assert [t.get_text() for t in pca_axes[0].get_legend().get_texts()] == [
        "real control",
        "real perturbed",
        "additive (predicted)",
    ]

    vocab = pd.DataFrame({"gene": genes, "vocab_id": range(25), "match": ["exact"] * 20 + ["none"] * 5})
    plot_gene_vocab_coverage(vocab, tmp_path / "vocab.png", "demo")
    _assert_png_has_content(tmp_path / "vocab.png")
    (vocab_ax,) = drawn["vocab.png"].axes
    assert [p.get_height() for p in vocab_ax.patches] == [20, 5]
    assert [t.get_text() for t in vocab_ax.get_xticklabels()] == ["exact", "none"]
    assert vocab_ax.get_title() == "demo: 20/25 genes in the scGPT vocabulary (80.0%)"

    steps = np.arange(0, 100, 10)
    loss = pd.DataFrame(
        {
            "step": steps,
            "total": 2 / (1 + steps),
            "expr": 1 / (1 + steps),
            "latent": 1 / (1 + steps),
            "mmd": 0.1 / (1 + steps),
            "lr": 1e-3,
        }
    )
    nolatent = loss.assign(latent=np.nan)
    plot_loss_curves({"ccfm": loss, "ccfm_nolatent": nolatent}, tmp_path / "loss.png", "demo fold 1")
    _assert_png_has_content(tmp_path / "loss.png")
    loss_axes = drawn["loss.png"].axes
    assert [ax.get_title() for ax in loss_axes] == ["total", "expr", "latent", "mmd", "lr"]
    for ax in loss_axes:
        variants = ["ccfm"] if ax.get_title() == "latent" else ["ccfm", "ccfm_nolatent"]  # no latent loss without it
        assert [line.get_label() for line in ax.lines] == variants
        for line in ax.lines:
            np.testing.assert_allclose(line.get_xdata(), steps)
            np.testing.assert_allclose(line.get_ydata(), loss[ax.get_title()])
    # Atomic writes leave only the figures.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "delta.png",
        "loss.png",
        "metrics.png",
        "pca.png",
        "vocab.png",
    ]


@pytest.fixture(scope="module")
def built_report(tmp_path_factory) -> Path:
    """A real Snakemake report with a figure in each of two categories."""
    workdir = tmp_path_factory.mktemp("mini_report")
    (workdir / "Snakefile").write_text(
        textwrap.dedent(
            """
        report: "workflow.rst"

        rule all:
            input: "results/a.png", "results/b.tsv"

        rule figure:
            output: report("results/a.png", caption="caption.rst", category="Metrics", subcategory="demo", labels={"dataset": "demo", "figure": "bars"})
            run:
                import matplotlib
                matplotlib.use("Agg")
                import matplotlib.pyplot as plt
                fig, ax = plt.subplots()
                ax.bar(["nochange", "additive"], [0.2, 0.7], color=["grey", "tab:blue"])
                fig.savefig(output[0])

        rule table:
            output: report("results/b.tsv", caption="caption.rst", category="Tables", labels={"dataset": "demo", "table": "t"})
            run:
                open(output[0], "w").write("method\\tvalue\\nadditive\\t0.7\\n")
        """
        )
    )
    (workdir / "workflow.rst").write_text("Mini workflow for the report checker.\n")
    (workdir / "caption.rst").write_text("A caption.\n")
    for args in (["-c1", "-q"], ["--report", "report.html"]):
        result = subprocess.run(
            [sys.executable, "-m", "snakemake", *args], cwd=workdir, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stdout + result.stderr
    return workdir / "report.html"


@pytest.mark.slow  # subprocess
def test_static_check_passes_and_catches_problems(built_report, tmp_path):
    good = checker.check_report(
        built_report, expect_categories=["Metrics", "Tables"], expect_files=["results/a.png"], browser=False
    )
    assert good.ok, good.summary()
    assert good.n_images == 1 and good.n_results == 2

    missing = checker.check_report(built_report, expect_categories=["Training"], browser=False)
    assert not missing.ok and "Training" in missing.summary()

    # Corrupt the embedded PNG: the static check must notice.
    html = built_report.read_text()
    broken = tmp_path / "broken.html"
    broken.write_text(html.replace("base64,iVBORw0KGgo", "base64,AAAAAAAA", 1))
    result = checker.check_report(broken, browser=False)
    assert any("not a PNG" in failure for failure in result.failures), result.summary()

    absent = checker.check_report(tmp_path / "nothing.html", browser=False)
    assert not absent.ok and "does not exist" in absent.failures[0]


@pytest.mark.slow  # subprocess
def test_report_renders_in_headless_chromium(built_report, tmp_path):
    if checker.find_chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    shot = tmp_path / "report.png"
    result = checker.check_report(built_report, screenshot=shot, category="Metrics", subcategory="demo")
    assert result.ok, result.summary()
    assert result.browser_decoded_images == 1 and result.browser_shown_image
    # The screenshot shows the opened bar chart: the additive bar's blue is on screen.
    pixels = mpimg.imread(shot)[..., :3]
    blue = (np.abs(pixels - np.array([0x1F, 0x77, 0xB4]) / 255).sum(axis=-1) < 0.05).sum()
    assert blue > 1000, f"no figure visible in {shot}"
