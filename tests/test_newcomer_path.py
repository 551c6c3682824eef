"""The newcomer path: the Makefile's set-up order and idempotence, the closing headline, the runtime table."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from ccfm.evaluate.headline import headline
from ccfm.evaluate.headline import main as headline_main
from ccfm.evaluate.runtime import read_benchmarks, write_runtime_report

ROOT = Path(__file__).resolve().parents[1]


def _make_dry_run(venv: Path, target: str) -> str:
    result = subprocess.run(
        ["make", "-n", "-C", str(ROOT), f"VENV={venv}", target], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_installs_in_order_once(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    commands = _make_dry_run(venv, "env")
    torch_at, package_at, scgpt_at = (
        commands.index(s) for s in ("torch==2.13.0", 'install --quiet -e ".[dev]"', "--no-deps scgpt==0.2.4")
    )
    # torch first (else the dependency resolve pulls a CUDA build), scGPT last and without its pins
    assert torch_at < package_at < scgpt_at
    # Once installed (the stamp is newer than pyproject.toml and the Makefile) nothing is reinstalled.
    (venv / "bin").mkdir(parents=True)
    newer = max((ROOT / "pyproject.toml").stat().st_mtime, (ROOT / "Makefile").stat().st_mtime) + 10
    for name in (".ccfm-installed", ".ccfm-state-installed"):
        (venv / name).touch()
        os.utime(venv / name, (newer, newer))
    assert "pip install" not in _make_dry_run(venv, "env")
    demo = _make_dry_run(venv, "demo")
    assert "pip install" not in demo
    assert "snakemake --cores 2 demo" in demo and "ccfm.evaluate.headline" in demo
    test = _make_dry_run(venv, "test")
    assert "pip install" not in test and "pytest" in test and "snakefmt --check" in test


def _summary(ccfm_mse: float) -> pd.DataFrame:
    rows = []
    for method, mse, pearson in (
        ("nochange", 0.23, 0.05),
        ("additive", 0.064, 0.86),
        ("ccfm", ccfm_mse, 0.9),
        ("meanpert", 0.2, 0.2),
    ):
        for fold in ("1", "all"):
            rows.append(
                {
                    "dataset": "demo",
                    "method": method,
                    "fold": fold,
                    "n_perturbations": 11.0,
                    "mse": mse,
                    "pearson_delta_pseudobulk": pearson,
                }
            )
    return pd.DataFrame(rows)


def test_headline_gives_ccfm_beside_the_baselines(tmp_path: Path) -> None:
    path = tmp_path / "metrics_summary.tsv"
    _summary(0.032).to_csv(path, sep="\t", index=False)
    text = headline(path)
    lines = text.splitlines()
    assert lines[0].startswith("demo: 11 held-out perturbations")
    assert [line.split()[0] for line in lines[1:4]] == ["ccfm", "additive", "nochange"]
    assert "MSE 0.0320" in lines[1] and "MSE 0.0640" in lines[2] and "MSE 0.2300" in lines[3]
    assert "2.00x lower than the additive" in lines[4]


def test_headline_says_plainly_when_ccfm_loses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "metrics_summary.tsv"
    _summary(0.128).to_csv(path, sep="\t", index=False)
    assert headline_main([str(path), "--report", "results/report.html"]) == 0
    out = capsys.readouterr().out
    assert "CCFM LOSES to the additive baseline on: MSE." in out
    assert "CCFM beats the additive baseline on: Pearson delta." in out
    assert out.rstrip().endswith("Report: results/report.html")


def test_headline_names_each_cell_metric_ccfm_loses(tmp_path: Path) -> None:
    summary = _summary(0.032)
    per_method = {  # DE overlap, energy distance, its floor, std ratio
        "ccfm": (0.60, 0.70, 0.55, 0.91),
        "additive": (0.65, 0.80, 0.55, 0.90),
        "nochange": (0.0, 2.9, 0.55, 1.0),
        "meanpert": (0.3, 2.8, 0.55, 0.95),
    }
    for column, index in (("celleval_overlap_at_N", 0), ("energy_distance", 1), ("energy_distance_floor", 2)):
        summary[column] = [per_method[m][index] for m in summary["method"]]
    summary["std_ratio"] = [per_method[m][3] for m in summary["method"]]
    path = tmp_path / "metrics_summary.tsv"
    summary.to_csv(path, sep="\t", index=False)
    lines = headline(path).splitlines()
    assert "DE overlap 0.600" in lines[1] and "energy distance 0.700 (real-vs-real 0.550)" in lines[1]
    assert "std ratio 0.91" in lines[1]
    assert lines[-2] == "  CCFM beats the additive baseline on: MSE, Pearson delta, energy distance."
    assert lines[-1] == "  CCFM LOSES to the additive baseline on: DE overlap."


def test_headline_names_a_missing_method(tmp_path: Path) -> None:
    path = tmp_path / "metrics_summary.tsv"
    _summary(0.03).query("method != 'additive'").to_csv(path, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"no pooled row for \['additive'\]"):
        headline(path)


def _benchmark(path: Path, seconds: float, cpu: float, rss: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
        f"{seconds}\t0:00:01\t{rss}\t1\t1\t1\t0\t0\t50\t{cpu}\n"
    )


def test_runtime_table_sums_the_benchmark_files(tmp_path: Path) -> None:
    dataset_dir, shared_dir = tmp_path / "results/demo/benchmarks", tmp_path / "results/benchmarks"
    _benchmark(dataset_dir / "fold1/ccfm/train_ccfm.tsv", 40.5, 38.0, 700.0)
    _benchmark(dataset_dir / "preprocess.tsv", 1.5, 1.4, 200.0)
    _benchmark(shared_dir / "scgpt/build_tiny.tsv", 3.0, 2.9, 340.0)
    table = read_benchmarks([dataset_dir, shared_dir])
    assert list(table["job"]) == ["fold1/ccfm/train_ccfm", "scgpt/build_tiny", "preprocess"]
    assert list(table["rule"]) == ["train_ccfm", "build_tiny", "preprocess"]
    out_tsv, out_png = tmp_path / "runtime.tsv", tmp_path / "runtime.png"
    write_runtime_report([dataset_dir, shared_dir], out_tsv, out_png, "demo")
    written = pd.read_csv(out_tsv, sep="\t").set_index("job")
    assert written.loc["total", "seconds"] == pytest.approx(45.0)
    assert written.loc["total", "cpu_seconds"] == pytest.approx(42.3)
    assert written.loc["total", "max_rss_mb"] == pytest.approx(700.0)
    assert out_png.stat().st_size > 1000


def test_runtime_table_refuses_a_foreign_tsv(tmp_path: Path) -> None:
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "notes.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="not a Snakemake benchmark file"):
        read_benchmarks([tmp_path / "bench"])
    with pytest.raises(ValueError, match="no benchmark files"):
        read_benchmarks([tmp_path / "empty"])


def test_native_thread_pools_follow_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    from ccfm.threads import POOL_VARIABLES, limit_native_threads

    for name in POOL_VARIABLES:
        monkeypatch.setenv(name, "64")
    limit_native_threads(2)
    assert {os.environ[name] for name in POOL_VARIABLES} == {"2"}
    limit_native_threads(0)
    assert os.environ["NUMBA_NUM_THREADS"] == "1"


@pytest.mark.slow  # subprocess
@pytest.mark.parametrize("elsewhere", [False, True], ids=["repository_root", "directory_elsewhere"])
def test_dry_run_from_the_root_and_with_directory_elsewhere(tmp_path: Path, elsewhere: bool) -> None:
    import sys

    args = [sys.executable, "-m", "snakemake", "-n", "--forceall", "demo"]
    if elsewhere:
        args += ["--directory", str(tmp_path)]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "train_ccfm" in output and "runtime" in output
    # Without a config/config.yaml of its own, the working directory uses the repository's.
    if elsewhere:
        assert str(ROOT / "config" / "config.yaml") in output.split("Config file(s):", 1)[1].splitlines()[0]
    assert not (tmp_path / "results").exists()
