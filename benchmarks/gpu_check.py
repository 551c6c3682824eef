"""GPU check: the pipeline's GPU path tested and timed in one command (``bash benchmarks/gpu_check.sh``).

On a CUDA machine, in a few minutes, at the schema's default sizes (the Norman configuration:
``model``/``train``/``latent``/``generate`` defaults of workflow/schemas/config.schema.yaml, a
``preprocess.n_top_genes`` panel of 5,000 genes, a 1,000-gene training window, batch 48) with a
randomly initialised scGPT of the whole-human architecture:

1. runs the ``gpu``-marked tests (bf16 training step, generation, scGPT extraction on CUDA, NCCL
   and DDP with one process per visible GPU);
2. times the package's own code paths (``ccfm.model.training.Trainer.train_step``,
   ``ccfm.scgpt.feature_cache`` / ``ccfm.scgpt.extractor``, ``ccfm.model.generation.predict_label``):
   training steps/s and cells/s with and without bf16 autocast, with the feature cache warm and
   off, with the GPU profile's threads, and peak GPU memory; scGPT extraction cells/s with the
   feature cache cold (building it) and warm (reading it); two-stage generation cells/s with rk4 x
   20 steps per stage; and from these the projected time of a 200k-step Norman run. Beside what the
   pipeline runs, a few candidates are timed and labelled as such (bf16 autocast for extraction and
   generation, latent targets prepared on the device);
3. compares one bf16 training step with an fp32 step on the same batch (same seed, same weights)
   and checks that the training loss falls over a few hundred steps on the demo data
   (``ccfm.data.simulate``, trained through ``train_from_files``, the ``train_ccfm`` rule's path);
4. writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out`` (default ``benchmarks/results``)
   with the GPU model, driver, CUDA and torch versions and the git commit.

Without CUDA (or with ``--device cpu``) the same code paths run on the CPU at tiny sizes (the demo's
model and the ``tiny`` scGPT) in well under two minutes; the files then say that no GPU was found
and every number is labelled as a CPU number. The exit status is non-zero when a check fails.

Every timing runs a fixed number of steps after warm-up (chosen from the warm-up's pace to fit a
time box of seconds), with ``torch.cuda.synchronize()`` around the timed region on a GPU. Torch
runs on one CPU thread (``--threads``), as the train_ccfm and predict rules do. A stage or variant
that fails is recorded and the rest still measured; both files are rewritten after every stage, so
a run stopped by a time limit keeps what it measured.

Usage: ``python benchmarks/gpu_check.py [--out DIR] [--device auto|cuda|cpu] [--skip-tests]``
(``benchmarks/gpu_check.sh`` prepares the environment and calls this).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Measure this checkout's code, whatever else is installed.
if str(REPO / "workflow") not in sys.path:
    sys.path.insert(0, str(REPO / "workflow"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger("gpu_check")

# Whole-human scGPT architecture (scGPT's cellxgene-census pretraining args.json) when the args
# file of ../shared is not at hand (a device machine holds the repository only).
WHOLE_HUMAN_SIZES = {"embsize": 512, "nlayers": 12, "nheads": 8, "d_hid": 512}
SHARED_ARGS = REPO.parent / "shared" / "data" / "real" / "scgpt_human_pretraining_args.json"

# Norman et al. 2019 as scPerturb releases it (NormanWeissman2019_filtered.h5ad): about 111k cells,
# about 105 singles and 131 doubles. With split.heldout_fraction 0.3 of the doubles held out, a
# fold trains on roughly 100k cells and predicts roughly 40 doubles. Approximate counts, only for
# the projection; override them with --norman-*.
NORMAN_TRAIN_CELLS = 100_000
NORMAN_HELDOUT = 40

BF16_LOSS_RTOL = 0.02  # |loss_bf16 - loss_fp32| / |loss_fp32| on one identical batch
LOSS_FALL_MIN = 0.10  # the mean loss of the last fifth of the log must be >= 10% below the first fifth's


# --------------------------------------------------------------------------------------------
# Sizes per mode
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What one run measures and at which sizes."""

    mode: str  # "gpu" or "cpu"
    device: str
    speed_simulate: dict[str, Any]  # simulate_demo sizes of the timing dataset
    speed_top_genes: int
    map_all_genes: bool  # rename unmapped genes to census symbols (every cell then has scGPT tokens, as Norman's)
    model: dict[str, Any]  # model section of the timing runs
    train: dict[str, Any]  # train section of the timing runs
    latent: dict[str, Any]
    scgpt_sizes: dict[str, int]
    scgpt_sizes_source: str
    warmup_steps: int
    timed_steps: int  # at most this many timed steps per training variant
    min_timed_steps: int
    training_budget_s: float  # time box per training variant (steps chosen from the warm-up's pace)
    warm_cache_batches: int
    generate: dict[str, Any]
    generate_cells: tuple[int, ...]  # cells timed per variant (warm-up with the first, the last timed)
    generation_budget_s: float
    demo_simulate: dict[str, Any]
    demo_sections: dict[str, dict[str, Any]]  # model/train/latent/preprocess sections of the loss check
    demo_steps: int
    demo_scgpt_sizes: dict[str, int]
    notes: list[str] = field(default_factory=list)


def _schema_defaults(section: str) -> dict[str, Any]:
    from ccfm.config import section_defaults

    return dict(section_defaults(section))


def _demo_config() -> tuple[dict[str, Any], dict[str, int]]:
    """The ``demo`` dataset block and ``scgpt.tiny`` sizes of config/config.yaml."""
    import yaml

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    return dict(config["datasets"]["demo"]), dict(config["scgpt"]["tiny"])


def whole_human_sizes() -> tuple[dict[str, int], str]:
    if SHARED_ARGS.is_file():
        args = json.loads(SHARED_ARGS.read_text())
        return {key: int(args[key]) for key in WHOLE_HUMAN_SIZES}, str(SHARED_ARGS)
    return dict(WHOLE_HUMAN_SIZES), "documented whole-human sizes (args.json of ../shared absent)"


def make_plan(device: str) -> Plan:
    demo, tiny = _demo_config()
    demo_sections = {name: dict(demo.get(name, {})) for name in ("model", "train", "latent", "preprocess")}
    latent = _schema_defaults("latent")
    generate = _schema_defaults("generate")
    if device == "cuda":
        sizes, source = whole_human_sizes()
        n_top = int(_schema_defaults("preprocess")["n_top_genes"])
        return Plan(
            mode="gpu",
            device="cuda",
            # ~1.7k training cells: a cache built in seconds, batches of 48 cells per perturbation
            speed_simulate={
                "n_genes": n_top + 200,  # preprocessing keeps the 5,000 most dispersed
                "n_singles": 12,
                "n_doubles": 18,
                "n_control_cells": 400,
                "cells_per_condition": 48,
                "n_target_control_cells": 50,
                "n_target_singles": 2,
                "n_target_doubles": 2,
                "target_cells_per_condition": 10,
            },
            speed_top_genes=n_top,
            map_all_genes=True,
            model=_schema_defaults("model"),
            train=_schema_defaults("train"),
            # calibration only supplies the statistics here: a few hundred cells suffice
            latent={**latent, "calibration_cells": 256},
            scgpt_sizes=sizes,
            scgpt_sizes_source=source,
            warmup_steps=3,
            timed_steps=60,
            min_timed_steps=5,
            training_budget_s=10.0,
            warm_cache_batches=5,
            generate=generate,
            generate_cells=(8, 64),
            generation_budget_s=45.0,
            demo_simulate={},
            demo_sections=demo_sections,
            demo_steps=300,
            demo_scgpt_sizes=tiny,
        )
    small_sim = {
        "n_control_cells": 300,
        "cells_per_condition": 24,
        "n_singles": 10,
        "n_doubles": 16,
        "n_target_control_cells": 30,
        "n_target_singles": 2,
        "n_target_doubles": 2,
        "target_cells_per_condition": 8,
    }
    demo_train = {**demo_sections["train"], "batch_size": 8, "infer_top_gene": 64, "log_every": 5}
    return Plan(
        mode="cpu",
        device="cpu",
        speed_simulate=small_sim,
        speed_top_genes=int(demo_sections["preprocess"].get("n_top_genes", 200)),
        map_all_genes=False,
        model=demo_sections["model"],
        train={**demo_train, "steps": 1000},
        latent={**latent, "calibration_cells": 64},
        scgpt_sizes=tiny,
        scgpt_sizes_source="config/config.yaml scgpt.tiny (CPU mode)",
        warmup_steps=2,
        timed_steps=8,
        min_timed_steps=3,
        training_budget_s=2.0,
        warm_cache_batches=5,
        generate=generate,
        generate_cells=(2, 8),
        generation_budget_s=10.0,
        demo_simulate=small_sim,
        demo_sections={**demo_sections, "train": demo_train, "latent": {"calibration_cells": 64}},
        demo_steps=60,
        demo_scgpt_sizes=tiny,
        notes=["CPU mode: tiny sizes (the demo's model and the tiny scGPT); numbers say nothing about a GPU"],
    )


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def _run_text(command: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit(given: str | None) -> str:
    if given:
        return given
    found = _run_text(["git", "rev-parse", "HEAD"], cwd=REPO)
    if found:
        dirty = _run_text(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO)
        return found + ("-dirty" if dirty else "")
    return "unknown (no git metadata here: pass --commit or CCFM_COMMIT)"


def nccl_version() -> str | None:
    if not torch.distributed.is_nccl_available():
        return None
    version = torch.cuda.nccl.version()  # a tuple in current torch, an int in old releases
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def environment(commit: str | None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "git_commit": git_commit(commit),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            {
                "gpu_count": torch.cuda.device_count(),
                "gpu_model": torch.cuda.get_device_name(0),
                "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "gpu_capability": f"{props.major}.{props.minor}",
                "cudnn": torch.backends.cudnn.version(),
                "nccl": nccl_version(),
            }
        )
        smi = _run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        info["driver"] = smi.splitlines()[0].strip() if smi else "unknown (nvidia-smi not found)"
    return info


# --------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def peak_memory(device: str, into: dict[str, Any]) -> Iterator[None]:
    """Peak GPU memory (GiB) allocated by torch inside the block; None on CPU."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        if device == "cuda":
            torch.cuda.synchronize()
            into["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        else:
            into["peak_gpu_memory_gib"] = None


def timed(device: str, work: Callable[[], Any]) -> tuple[Any, float]:
    synchronize(device)
    started = time.perf_counter()
    result = work()
    synchronize(device)
    return result, time.perf_counter() - started


def free_device(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Data: simulated screen -> processed.h5ad, fold split, gene vocabulary
# --------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    processed: Path
    split_json: Path
    gene_vocab: Path
    train_labels: list[str]
    test_labels: list[str]
    n_cells: int
    n_genes: int
    mapped_genes: int


def _map_every_gene(raw: Path) -> int:
    """Rename the simulator's synthetic genes to unused census symbols (in place); return how many.

    Norman's 5,000 highly variable genes nearly all map into the scGPT vocabulary, so each of its
    cells carries the full ``latent.max_tokens_per_cell`` tokens; the simulator's synthetic names
    map to nothing, which would make extraction look far cheaper than on real data.
    """
    import anndata as ad

    from ccfm.scgpt.checkpoint import census_vocab_with_specials

    adata = ad.read_h5ad(raw)
    vocab = census_vocab_with_specials()
    names = [str(g) for g in adata.var_names]
    taken = {g.upper() for g in names}
    unmapped = [i for i, g in enumerate(names) if g not in vocab]
    spare = (s for s in vocab if not s.startswith("<") and s.upper() not in taken and s.isalnum())
    for i in unmapped:
        names[i] = next(spare)
    adata.var_names = names
    adata.write_h5ad(raw)
    return len(unmapped)


def prepare_dataset(root: Path, simulate: Mapping[str, Any], n_top_genes: int, seed: int, map_all: bool) -> Dataset:
    """simulate_demo -> preprocess_dataset -> split (fold 1) -> gene vocabulary: the pipeline's own steps."""
    from ccfm.data.preprocess import PreprocessSettings, preprocess_dataset
    from ccfm.data.simulate import simulate_demo
    from ccfm.data.splits import split_for_processed
    from ccfm.io.splits import write_split
    from ccfm.scgpt.checkpoint import census_vocab_with_specials
    from ccfm.scgpt.vocab import map_genes, write_gene_vocab

    root.mkdir(parents=True, exist_ok=True)
    paths = simulate_demo(root / "sim", seed, **simulate)
    if map_all:
        _map_every_gene(paths["raw"])
    processed = root / "processed.h5ad"
    preprocess_dataset(
        paths["raw"], processed, PreprocessSettings(dataset="gpu_check", input_scale="counts", n_top_genes=n_top_genes)
    )
    split_defaults = _schema_defaults("split")
    split = split_for_processed(
        processed, fold=1, seed=seed, heldout_fraction=float(split_defaults["heldout_fraction"]), n_folds=1
    )
    split_json = write_split(split, root / "fold1.json")
    from ccfm.io.h5ad import read_var

    genes = list(read_var(processed).index.astype(str))
    mapping = map_genes(genes, census_vocab_with_specials())
    gene_vocab = root / "gene_vocab.tsv"
    write_gene_vocab(mapping, gene_vocab)
    return Dataset(
        processed,
        split_json,
        gene_vocab,
        [str(x) for x in split["train"]],
        [str(x) for x in split["test"]],
        int(split["n_cells"]["train"] + split["n_cells"]["test"] + split["n_cells"]["controls"]),
        len(genes),
        int(mapping["vocab_id"].notna().sum()),
    )


# --------------------------------------------------------------------------------------------
# The gpu-marked tests
# --------------------------------------------------------------------------------------------


def gpu_test_files() -> list[str]:
    files = []
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        if "pytest.mark.gpu" in path.read_text():
            files.append(str(path.relative_to(REPO)))
    return files


def run_gpu_tests(timeout_s: float) -> dict[str, Any]:
    files = gpu_test_files()
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rs", *files]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "workflow"), env.get("PYTHONPATH", "")) if p)
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as error:
        output, code = f"{error.stdout or ''}{error.stderr or ''}\ntimed out after {timeout_s:.0f} s", -1
    counts = {
        kind: int(m.group(1)) if (m := re.search(rf"(\d+) {kind}", output)) else 0
        for kind in ("passed", "failed", "skipped", "error", "deselected")
    }
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    return {
        "command": " ".join(["python", *command[1:]]),
        "files": files,
        "returncode": code,
        **counts,
        "summary": summary[-1].strip("= ") if summary else output.strip().splitlines()[-1:] or "",
        "seconds": round(time.perf_counter() - started, 1),
        "output_tail": output[-3000:],
    }


# --------------------------------------------------------------------------------------------
# scGPT: checkpoint, extraction cold and warm
# --------------------------------------------------------------------------------------------


def build_scgpt(root: Path, sizes: Mapping[str, int], seed: int) -> Path:
    """A randomly initialised scGPT checkpoint of these sizes (``build_tiny_checkpoint``, the real builder)."""
    from ccfm.scgpt.checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(root / "scgpt", seed=seed, **sizes)


def make_extractor(scgpt_dir: Path, data: Dataset, latent: Mapping[str, Any], device: str, seed: int, **extra: Any):
    from ccfm.scgpt.extractor import ExtractorSettings, ScGPTFeatureExtractor
    from ccfm.scgpt.vocab import read_gene_vocab, vocab_id_array

    return ScGPTFeatureExtractor(
        scgpt_dir,
        vocab_id_array(read_gene_vocab(data.gene_vocab)),
        device,
        settings=dataclasses.replace(ExtractorSettings.from_latent(latent, seed), **extra),
    )


def training_rows(data: Dataset) -> np.ndarray:
    from ccfm.scgpt.calibration import training_cell_indices

    return training_cell_indices(data.processed, data.split_json)


def measure_extraction(plan: Plan, data: Dataset, scgpt_dir: Path, root: Path, seed: int) -> tuple[dict, Any, Any]:
    """Cold: build the feature cache of every training cell (``make_latent_source``: count tokens,
    tokenise, encode, write); warm: read it back through ``scgpt_latent_targets`` in training batches.

    Returns (numbers, the warm feature source, the fold's latent statistics).
    """
    from ccfm.model.training import scgpt_latent_targets
    from ccfm.scgpt.calibration import calibrate
    from ccfm.scgpt.feature_cache import count_tokens, make_latent_source

    device = plan.device
    rows = training_rows(data)
    out: dict[str, Any] = {"cells": int(rows.size), "scgpt_sizes": dict(plan.scgpt_sizes)}
    extractor = make_extractor(scgpt_dir, data, plan.latent, device, seed)
    out["batching"] = extractor.batching
    tokens = count_tokens(extractor, data.processed, rows)
    out["tokens_per_cell_mean"] = round(float(tokens.mean()), 1)
    # warm-up: model load, kernels (not timed)
    extractor.extract(np.zeros((2, extractor.n_genes), dtype=np.float32) + 1.0)
    variants = [("fp32", {})]
    if device == "cuda":
        variants.append(("bf16_autocast", {"autocast_bf16": True}))  # candidate: the pipeline extracts in fp32
    for name, extra in variants:
        this = extractor if not extra else make_extractor(scgpt_dir, data, plan.latent, device, seed, **extra)
        cache_dir = root / f"feature_cache_{name}"
        entry: dict[str, Any] = {}
        with peak_memory(device, entry):
            _, seconds = timed(
                device,
                lambda this=this, cache_dir=cache_dir: make_latent_source(
                    "on", this, data.processed, rows, cache_dir, float(plan.latent["cache_max_gb"])
                ),
            )
        entry.update({"seconds": round(seconds, 3), "cells_per_s": rows.size / seconds})
        out[f"cold_{name}"] = entry
    # calibration over the training cells (the calibrate_latent rule's function)
    stats, seconds = timed(
        device,
        lambda: calibrate(
            extractor,
            data.processed,
            rows,
            batch_size=int(plan.latent["batch_size"]),
            max_cells=int(plan.latent["calibration_cells"]),
            seed=seed,
            target_std=float(plan.latent["target_std"]),
        ),
    )
    out["calibration"] = {"cells": int(min(rows.size, plan.latent["calibration_cells"])), "seconds": round(seconds, 3)}
    # warm: a second make_latent_source finds the manifest and reads the cache
    warm_source, seconds = timed(
        device,
        lambda: make_latent_source(
            "on", extractor, data.processed, rows, root / "feature_cache_fp32", float(plan.latent["cache_max_gb"])
        ),
    )
    assert type(warm_source).__name__ == "CachedSource", "the second call must reuse the cache"
    out["warm_open_seconds"] = round(seconds, 3)
    from ccfm.model.expression import load_expression
    from ccfm.scgpt.feature_cache import OnTheFlySource

    expression = load_expression(data.processed)
    batch = int(plan.train["batch_size"])
    rng = np.random.default_rng(seed)
    draws = [np.sort(rng.choice(rows, size=batch, replace=False)) for _ in range(plan.warm_cache_batches + 1)]
    dense = [expression.dense_rows(d) for d in draws]
    readers = {
        "warm": (
            scgpt_latent_targets(warm_source, stats),
            "as shipped: scatter to (cells, genes, D) and normalise on the CPU",
        ),
        "warm_targets_on_device": (
            latent_targets_on_device(warm_source, stats, device),
            "candidate: the same on the training device",
        ),
    }
    for name, (targets, note) in readers.items():
        targets(draws[0], dense[0])  # warm-up

        def read_all(targets: LatentTargetsFn = targets) -> None:
            for cells, expr in zip(draws[1:], dense[1:]):
                targets(cells, expr).to(device)  # Trainer._tensors moves them to the device next

        _, seconds = timed(device, read_all)
        out[name] = {
            "batches": plan.warm_cache_batches,
            "batch_cells": batch,
            "seconds": round(seconds, 3),
            "cells_per_s": plan.warm_cache_batches * batch / seconds,
            "note": note,
        }
    free_device(device)
    return out, {"cache": warm_source, "off": OnTheFlySource(extractor)}, stats


LatentTargetsFn = Callable[[np.ndarray, np.ndarray], torch.Tensor]


def latent_targets_on_device(source: Any, stats: Any, device: str) -> LatentTargetsFn:
    """Candidate fix, NOT the shipped code: ``ccfm.model.training.scgpt_latent_targets`` with the
    expression moved to the training device first, so that the feature source scatters the features
    into the (cells, genes, D) tensor and ``stats.normalize`` runs there instead of on one CPU thread.
    Identical to the shipped function on the CPU."""

    def targets(cell_rows: np.ndarray, expression: np.ndarray) -> torch.Tensor:
        expr = torch.from_numpy(expression).to(device)
        return stats.normalize(source.features(cell_rows, expr), source.covered_mask(cell_rows, expr))

    return targets


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def make_trainer(
    plan: Plan,
    data: Dataset,
    expression: Any,
    targets: LatentTargetsFn | None,
    bf16: bool,
    resume: Path,
    seed: int,
    mean_model: Any,
):
    """A Trainer built as ``train_from_files`` builds it, with the given latent-target callable."""
    from ccfm.data.perturbations import PerturbationVocab
    from ccfm.model.training import ResumePoint, Trainer, TrainingSet, TrainSettings, build_denoiser, run_fingerprint

    train_section = {**plan.train, "bf16": bf16}
    settings = TrainSettings.from_train_section(train_section)
    vocab = PerturbationVocab.for_genes(expression.genes, data.train_labels, data.test_labels)
    latent_dim = int(plan.scgpt_sizes["embsize"]) if targets is not None else 0
    denoiser = build_denoiser(expression.n_genes, plan.model, train_section, latent_dim, vocab, seed)
    return Trainer(
        denoiser,
        TrainingSet(expression, data.train_labels, vocab, latent_targets=targets, mean_model=mean_model),
        settings,
        ResumePoint(resume, fingerprint=run_fingerprint(settings, denoiser, vocab, data.train_labels, seed)),
        seed=seed,
        device=plan.device,
    )


def time_training(trainer: Any, plan: Plan) -> tuple[dict[str, Any], dict[str, float]]:
    """Warm-up steps, then a fixed number of steps chosen from the warm-up's pace to fit the time box.

    Returns (numbers, the first step's loss values).
    """
    device = plan.device
    first, warm_s = timed(device, trainer.train_step)
    if plan.warmup_steps > 1:
        _, warm_s = timed(device, lambda: [trainer.train_step() for _ in range(plan.warmup_steps - 1)])
        warm_s /= plan.warmup_steps - 1
    steps = int(min(plan.timed_steps, max(plan.min_timed_steps, plan.training_budget_s // max(warm_s, 1e-6))))
    entry: dict[str, Any] = {}
    extract_before = trainer.extract_seconds
    losses: list[float] = []
    with peak_memory(device, entry):
        _, seconds = timed(device, lambda: [losses.append(trainer.train_step()["total"]) for _ in range(steps)])
    steps_per_s = steps / seconds
    entry.update(
        {
            "steps": steps,
            "seconds": round(seconds, 3),
            "steps_per_s": steps_per_s,
            "cells_per_s": steps_per_s * trainer.settings.batch_size,
            "latent_targets_share": round((trainer.extract_seconds - extract_before) / seconds, 3),
            "bf16_active": bool(trainer.settings.bf16 and trainer.device.type == "cuda"),
            "losses_finite": bool(np.isfinite(losses).all()),
        }
    )
    return entry, first


# (key, variant, precision, feature source: "cache" / "off" / None, targets on the device (candidate),
# torch threads: None = --threads (the rule's default 1), "profile" = profiles/gpu's set-threads, what)
TRAINING_VARIANTS = (
    ("ccfm_fp32", "ccfm", "fp32", "cache", False, None, "feature cache warm"),
    ("ccfm_bf16", "ccfm", "bf16", "cache", False, None, "feature cache warm"),
    ("ccfm_bf16_cache_off", "ccfm", "bf16", "off", False, None, "features extracted on the fly (latent.cache off)"),
    (
        "ccfm_bf16_profile_threads",
        "ccfm",
        "bf16",
        "cache",
        False,
        "profile",
        "feature cache warm, profiles/gpu threads",
    ),
    (
        "ccfm_bf16_targets_on_device",
        "ccfm",
        "bf16",
        "cache",
        True,
        None,
        "candidate fix: latent targets scattered and normalised on the device",
    ),
    ("ccfm_nolatent_fp32", "ccfm_nolatent", "fp32", None, False, None, "no scGPT"),
    ("ccfm_nolatent_bf16", "ccfm_nolatent", "bf16", None, False, None, "no scGPT"),
)


def profile_train_threads() -> int:
    """``set-threads: train_ccfm`` of profiles/gpu (1, the rule's own value, when absent)."""
    import yaml

    profile = yaml.safe_load((REPO / "profiles" / "gpu" / "config.v8+.yaml").read_text())
    return int((profile.get("set-threads") or {}).get("train_ccfm", 1))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_training(
    plan: Plan, data: Dataset, sources: Mapping[str, Any], stats: Any, root: Path, seed: int
) -> tuple[dict[str, Any], dict[str, Any], tuple[dict[str, Any], Any]]:
    """Steps/s of each of :data:`TRAINING_VARIANTS`; bf16 vs fp32 on one batch.

    Returns (training numbers, the bf16-vs-fp32 comparison, (the default-precision trainers by
    variant, the mean model)).
    """
    from ccfm.model.expression import load_expression
    from ccfm.model.mean_model import MeanModelSettings
    from ccfm.model.training import fit_mean_model, scgpt_latent_targets

    expression = load_expression(data.processed, keep_labels=[*data.train_labels, "non-targeting"])
    mean_settings = MeanModelSettings.from_sections(plan.model, plan.train)
    mean_model, seconds = timed(
        "cpu",
        lambda: (
            fit_mean_model(expression, data.train_labels, mean_settings, seed)
            if mean_settings.anchor == "additive"
            else None
        ),
    )
    out: dict[str, Any] = {"mean_model_fit_seconds": round(seconds, 2)}
    firsts: dict[str, dict[str, float]] = {}
    kept: dict[str, Any] = {}
    for key, variant, precision, source_name, on_device, threads, what in TRAINING_VARIANTS:
        targets = None
        if source_name is not None:
            source = sources[source_name]
            targets = (
                latent_targets_on_device(source, stats, plan.device)
                if on_device
                else scgpt_latent_targets(source, stats)
            )
        trainer = make_trainer(
            plan, data, expression, targets, precision == "bf16", root / f"resume_{key}", seed, mean_model
        )
        cpus = os.cpu_count() or 1
        n_threads = min(profile_train_threads(), cpus) if threads == "profile" else torch.get_num_threads()
        try:
            with torch_threads(n_threads):
                entry, first = time_training(trainer, plan)
        except Exception as error:  # e.g. out of memory in one variant: record it, measure the others
            out[key] = {"variant": variant, "precision": precision, "what": what, "error": repr(error)}
            del trainer
            free_device(plan.device)
            continue
        entry.update({"variant": variant, "precision": precision, "what": what, "torch_threads": n_threads})
        entry["parameters"] = sum(p.numel() for p in trainer.denoiser.parameters())
        out[key] = entry
        firsts[key] = first
        if key in ("ccfm_bf16", "ccfm_nolatent_bf16"):  # the default precision: generation runs on these weights
            kept[variant] = trainer
        else:
            del trainer
        free_device(plan.device)
    if "ccfm_fp32" in firsts and "ccfm_bf16" in firsts:
        comparison = compare_bf16(firsts, plan)
    else:
        comparison = {"within_tolerance": False, "rel_diff": float("nan"), "error": "a ccfm training variant failed"}
    return out, comparison, (kept, mean_model)


def compare_bf16(firsts: Mapping[str, Mapping[str, float]], plan: Plan) -> dict[str, Any]:
    """First step of identically seeded trainers: same weights, same batch, same noise."""
    fp32, bf16 = firsts["ccfm_fp32"], firsts["ccfm_bf16"]
    active = plan.device == "cuda"
    components = {}
    for name in ("total", "expr", "latent", "mmd"):
        a, b = float(fp32[name]), float(bf16[name])
        components[name] = {"fp32": a, "bf16": b, "rel_diff": abs(b - a) / max(abs(a), 1e-12)}
    rel = components["total"]["rel_diff"]
    result = {
        "bf16_active": active,
        "tolerance_rel": BF16_LOSS_RTOL,
        "loss_fp32": components["total"]["fp32"],
        "loss_bf16": components["total"]["bf16"],
        "rel_diff": rel,
        "components": components,
        "within_tolerance": bool(math.isfinite(rel) and rel <= BF16_LOSS_RTOL),
    }
    if not active:
        # Trainer autocasts on CUDA only: both steps ran in fp32, so they must agree exactly.
        result["note"] = "CPU: Trainer applies bf16 autocast on CUDA only, so both steps ran in fp32 (must be equal)"
        result["within_tolerance"] = bool(rel == 0.0)
    return result


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def measure_generation(plan: Plan, data: Dataset, kept: tuple[dict[str, Any], Any], root: Path, seed: int) -> dict:
    """``predict_label`` (the predict rule's per-perturbation call) over all genes, per variant.

    The bf16-trained weights of each variant are saved with ``save_model`` and loaded with
    ``load_model`` as the predict rule does. fp32 is what the pipeline runs; on a GPU the same
    call under bf16 autocast is timed as a candidate.
    """
    from ccfm.model.checkpoint import load_model, save_model
    from ccfm.model.generation import GenerateSettings, predict_label, read_control_cells

    trainers, mean_model = kept
    device = plan.device
    out: dict[str, Any] = {
        "method": plan.generate["method"],
        "latent_steps": plan.generate["latent_steps"],
        "expr_steps": plan.generate["expr_steps"],
        "genes": data.n_genes,
    }
    model_files = {}
    for variant, trainer in trainers.items():
        model_files[variant] = root / f"speed_{variant}.pt"
        save_model(model_files[variant], trainer.denoiser, trainer.vocab, {"gpu_check": True}, mean_model=mean_model)
    trainers.clear()
    free_device(device)
    controls = read_control_cells(data.processed)
    control_rows = np.arange(controls.matrix.shape[0])
    label = data.test_labels[0]
    per_eval = {"rk4": 4, "midpoint": 2, "euler": 1}.get(plan.generate["method"])
    precisions: list[tuple[str, Callable[[], Any]]] = [("fp32", contextlib.nullcontext)]
    if device == "cuda":
        # candidate only: predict_label itself runs without autocast
        precisions.append(("bf16_autocast", lambda: torch.autocast("cuda", dtype=torch.bfloat16)))
    budget = plan.generation_budget_s / (len(precisions) * len(model_files))
    for variant, path in model_files.items():
        model = load_model(path, device)
        latent_stage = model.denoiser.latent_enabled
        evals = None
        if per_eval is not None:
            evals = per_eval * ((plan.generate["expr_steps"] - 1) + (plan.generate["latent_steps"] - 1) * latent_stage)
        for precision, context in precisions:
            entry: dict[str, Any] = {"stages": 2 if latent_stage else 1, "evaluations_per_batch": evals}
            measured = None
            for n_cells in plan.generate_cells:
                settings = GenerateSettings.from_section({**plan.generate, "cells_per_perturbation": n_cells})

                def run(settings: GenerateSettings = settings, context: Callable[[], Any] = context, model=model):
                    with context():
                        return predict_label(model, controls, control_rows, label, settings, seed, torch.device(device))

                try:
                    with peak_memory(device, entry):
                        cells, seconds = timed(device, run)
                except Exception as error:  # e.g. out of memory at this size: keep the smaller size's numbers
                    entry["error_at_cells"] = {"cells": n_cells, "error": repr(error)}
                    free_device(device)
                    break
                measured = {
                    "cells": n_cells,
                    "seconds": round(seconds, 3),
                    "cells_per_s": n_cells / seconds,
                    "finite": bool(np.isfinite(cells).all()),
                    "shape_ok": cells.shape == (n_cells, data.n_genes),
                }
                # the next size only if it fits the time box at the rate just seen
                if n_cells != plan.generate_cells[-1] and seconds * plan.generate_cells[-1] / n_cells > budget:
                    entry["note"] = f"stopped at {n_cells} cells: the next size would not fit {budget:.0f} s"
                    break
            if measured is None:
                entry["error"] = entry["error_at_cells"]["error"]
            else:
                entry.update(measured)
            out[f"{variant}_{precision}"] = entry
        del model
        free_device(device)
    return out


# --------------------------------------------------------------------------------------------
# Loss on the demo data
# --------------------------------------------------------------------------------------------


def loss_check(plan: Plan, root: Path, seed: int) -> dict[str, Any]:
    """Train the demo configuration through ``train_from_files`` (the train_ccfm rule's function)."""
    import pandas as pd

    from ccfm.model.training import TrainRequest, train_from_files
    from ccfm.scgpt.calibration import calibrate_to_files

    sections = plan.demo_sections
    data = prepare_dataset(
        root / "demo",
        plan.demo_simulate,
        int(sections["preprocess"].get("n_top_genes", 200)),
        seed,
        map_all=False,
    )
    scgpt_dir = build_scgpt(root / "demo", plan.demo_scgpt_sizes, seed)
    latent = {**_schema_defaults("latent"), **sections["latent"]}
    model = {**_schema_defaults("model"), **sections["model"]}
    train = {**_schema_defaults("train"), **sections["train"], "steps": plan.demo_steps}
    train["checkpoint_every"] = plan.demo_steps
    # The check is of the optimiser on the device, so it uses the coupling whose loss falls far
    # in a few steps: with the default (another control cell shown, OT pairs) the within-condition
    # spread is irreducible and 60 CPU steps move the loss by a few percent only
    # (tests/model/test_training.py::test_loss_goes_down measures both).
    train.update(condition_cell="start", coupling="independent")
    stats_path = root / "demo" / "latent_stats.pt"
    calibrate_to_files(
        data.processed,
        data.split_json,
        data.gene_vocab,
        scgpt_dir / "best_model.pt",
        stats_path,
        latent=latent,
        seed=seed,
        threads=torch.get_num_threads(),
    )
    out_dir = root / "demo" / "ccfm"
    out_dir.mkdir(parents=True, exist_ok=True)
    result, seconds = timed(
        plan.device,
        lambda: train_from_files(
            TrainRequest(
                processed_h5ad=data.processed,
                split_json=data.split_json,
                out_model=out_dir / "model.pt",
                out_loss=out_dir / "loss.tsv",
                resume_dir=out_dir / "resume",
                model_section=model,
                train_section=train,
                latent_section=latent,
                seed=seed,
                use_latent=True,
                scgpt_dir=scgpt_dir,
                gene_vocab_tsv=data.gene_vocab,
                latent_stats=stats_path,
            ),
            device=plan.device,
            progress=False,
        ),
    )
    loss = pd.read_csv(out_dir / "loss.tsv", sep="\t")
    fifth = max(1, len(loss) // 5)
    first, last = float(loss["total"].iloc[:fifth].mean()), float(loss["total"].iloc[-fifth:].mean())
    drop = (first - last) / first if first > 0 else float("nan")
    return {
        "steps": plan.demo_steps,
        "model": {k: model[k] for k in ("d_model", "nhead", "nlayers")},
        "batch_size": train["batch_size"],
        "lr": train["lr"],
        "bf16_active": bool(train.get("bf16", True) and plan.device == "cuda"),
        "latent": True,
        "genes": data.n_genes,
        "log_rows": len(loss),
        "first_fifth_mean": first,
        "last_fifth_mean": last,
        "relative_drop": drop,
        "required_drop": LOSS_FALL_MIN,
        "fell": bool(math.isfinite(drop) and drop >= LOSS_FALL_MIN),
        "finite": bool(np.isfinite(loss[["total", "expr", "latent", "mmd"]].to_numpy()).all()),
        "seconds": round(seconds, 2),
        "steps_per_s": plan.demo_steps / seconds,
    }


# --------------------------------------------------------------------------------------------
# Projection
# --------------------------------------------------------------------------------------------


def projection(
    plan: Plan, training: Mapping[str, Any], extraction: Mapping[str, Any], generation: Mapping[str, Any], args: Any
) -> dict[str, Any]:
    """Hours of the GPU-bound work of one Norman fold at the measured rates (both CCFM variants).

    ``latent.cache: auto`` (the default) caches the features only if they fit ``latent.cache_max_gb``;
    Norman's training cells carry ``max_tokens_per_cell`` tokens each (zero tokens on, nearly every
    gene mapped), so the cache size follows from the tokens per cell measured here.
    """
    from ccfm.scgpt.feature_cache import estimate_cache_gb

    steps = int(_schema_defaults("train")["steps"])
    cells_per_pert = int(_schema_defaults("generate")["cells_per_perturbation"])
    latent = _schema_defaults("latent")
    tokens = args.norman_train_cells * extraction["tokens_per_cell_mean"]
    cache_gb = estimate_cache_gb(int(tokens), int(plan.scgpt_sizes["embsize"]))
    cached = latent["cache"] in ("on", True) or (latent["cache"] == "auto" and cache_gb <= latent["cache_max_gb"])
    ccfm_key = "ccfm_bf16" if cached else "ccfm_bf16_cache_off"
    train_ccfm = steps / training[ccfm_key]["steps_per_s"] / 3600
    train_fixed = steps / training["ccfm_bf16_targets_on_device"]["steps_per_s"] / 3600
    train_plain = steps / training["ccfm_nolatent_bf16"]["steps_per_s"] / 3600
    cache_h = args.norman_train_cells / extraction["cold_fp32"]["cells_per_s"] / 3600 if cached else 0.0
    generated = args.norman_heldout * cells_per_pert
    gen_hours = sum(generated / generation[f"{v}_fp32"]["cells_per_s"] / 3600 for v in ("ccfm", "ccfm_nolatent"))
    out = {
        "label": (
            "at the rates measured on this GPU"
            if plan.mode == "gpu"
            else "CPU at tiny sizes: exercises the arithmetic only, NOT an estimate of a Norman run"
        ),
        "assumptions": {
            "train_steps": steps,
            "norman_training_cells": args.norman_train_cells,
            "norman_heldout_perturbations": args.norman_heldout,
            "cells_per_perturbation": cells_per_pert,
            "folds": 1,
            "train_precision": "bf16 autocast (train.bf16 default)",
            "generation_precision": "fp32 (as shipped)",
            "tokens_per_cell": extraction["tokens_per_cell_mean"],
        },
        "feature_cache_gb": cache_gb,
        "feature_cache_max_gb": latent["cache_max_gb"],
        "feature_cache_used": cached,
        "ccfm_training_variant": ccfm_key,
        "train_ccfm_h": train_ccfm,
        "train_ccfm_nolatent_h": train_plain,
        "feature_cache_build_h": cache_h,
        "generation_both_variants_h": gen_hours,
        "train_ccfm_with_candidate_fix_h": train_fixed,
    }
    out["total_gpu_h"] = train_ccfm + train_plain + cache_h + gen_hours
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def _md_tests(report: Mapping[str, Any], unit: str) -> list[str]:
    lines: list[str] = []
    tests = report["tests"]
    lines += [
        "## gpu-marked tests",
        "",
        f"`{tests['command']}`: {tests['summary']} (exit {tests['returncode']}, {tests['seconds']} s).",
        "",
    ]
    return lines


def _md_training(report: Mapping[str, Any], unit: str) -> list[str]:
    lines: list[str] = []
    lines += [
        f"## Training ({unit} numbers)",
        "",
        "`Trainer.train_step` (optimiser step included), steps timed after warm-up; latent-target share: the part "
        "of the step spent preparing the scGPT targets (`Trainer.extract_seconds`).",
        "",
        "| variant | precision | scGPT features | torch threads | steps | steps/s | cells/s | latent-target share "
        "| peak GPU memory GiB | parameters |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in report["training"].values():
        if not isinstance(entry, dict):
            continue
        if "error" in entry:
            lines.append(f"| {entry['variant']} | {entry['precision']} | {entry['what']} | FAILED: {entry['error']} |")
            continue
        precision = entry["precision"]
        shown = precision if entry["bf16_active"] or precision == "fp32" else "bf16 requested (CPU: fp32)"
        lines.append(
            f"| {entry['variant']} | {shown} | {entry['what']} | {entry['torch_threads']} | {entry['steps']} | "
            f"{_fmt(entry['steps_per_s'])} | "
            f"{_fmt(entry['cells_per_s'])} | {_fmt(entry['latent_targets_share'])} | "
            f"{_fmt(entry['peak_gpu_memory_gib'])} | {entry['parameters']:,} |"
        )
    cmp_ = report["bf16_vs_fp32"]
    if "error" in cmp_:
        return [*lines, "", f"bf16 vs fp32: not compared ({cmp_['error']}).", ""]
    lines += [
        "",
        f"bf16 vs fp32, one step on the same batch: loss {cmp_['loss_bf16']:.6g} vs {cmp_['loss_fp32']:.6g}, "
        f"relative difference {cmp_['rel_diff']:.2e} (tolerance {cmp_['tolerance_rel']}): "
        f"{'within' if cmp_['within_tolerance'] else 'OUTSIDE'}" + (f". {cmp_['note']}" if "note" in cmp_ else "."),
        "",
    ]
    return lines


def _md_extraction(report: Mapping[str, Any], unit: str) -> list[str]:
    lines: list[str] = []
    ex = report["extraction"]
    lines += [
        f"## scGPT feature extraction ({unit} numbers)",
        "",
        f"{ex['cells']} training cells, {ex['tokens_per_cell_mean']} tokens per cell, scGPT "
        f"{ex['scgpt_sizes']}, batching `{ex['batching']}`.",
        "",
        "| cache | what | cells/s | seconds | peak GPU memory GiB |",
        "|---|---|---|---|---|",
    ]
    for name in ("cold_fp32", "cold_bf16_autocast"):
        if name in ex:
            what = "extract + write, " + ("fp32 (as shipped)" if name == "cold_fp32" else "bf16 autocast (candidate)")
            e = ex[name]
            lines.append(
                f"| cold | {what} | {_fmt(e['cells_per_s'])} | {e['seconds']} | {_fmt(e['peak_gpu_memory_gib'])} |"
            )
    for name in ("warm", "warm_targets_on_device"):
        w = ex[name]
        lines.append(
            f"| warm | read {w['batches']} batches of {w['batch_cells']} cells, {w['note']} | "
            f"{_fmt(w['cells_per_s'])} | {w['seconds']} | – |"
        )
    lines.append("")
    return lines


def _md_generation(report: Mapping[str, Any], unit: str) -> list[str]:
    lines: list[str] = []
    gen = report["generation"]
    lines += [
        f"## Generation ({unit} numbers)",
        "",
        f"`predict_label` over all {gen['genes']} genes, {gen['method']} with {gen['latent_steps']} (latent "
        f"stage) and {gen['expr_steps']} (expression stage) time points; model files loaded as the predict rule does.",
        "",
        "| variant | precision | stages | evaluations per batch | cells | seconds | cells/s | peak GPU memory GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, e in gen.items():
        if not isinstance(e, dict):
            continue
        if "error" in e:
            lines.append(f"| {key} | FAILED: {e['error']} |")
            continue
        variant, precision = (
            key.split("_fp32")[0] if key.endswith("_fp32") else key.split("_bf16")[0],
            ("fp32 (as shipped)" if key.endswith("_fp32") else "bf16 autocast (candidate)"),
        )
        lines.append(
            f"| {variant} | {precision} | {e['stages']} | {e['evaluations_per_batch']} | {e['cells']} | "
            f"{e['seconds']} | {_fmt(e['cells_per_s'])} | {_fmt(e['peak_gpu_memory_gib'])} |"
        )
    return lines


def _md_projection(report: Mapping[str, Any], unit: str) -> list[str]:
    lines: list[str] = []
    proj = report["projection"]
    lines += [
        "",
        f"## Projected Norman run ({proj['label']})",
        "",
        "| part | hours |",
        "|---|---|",
        f"| train `ccfm`, {proj['assumptions']['train_steps']:,} steps, at the `{proj['ccfm_training_variant']}` rate "
        f"(feature cache {proj['feature_cache_gb']:.0f} GB against latent.cache_max_gb "
        f"{proj['feature_cache_max_gb']}: {'cached' if proj['feature_cache_used'] else 'features on the fly'}) | "
        f"{_fmt(proj['train_ccfm_h'])} |",
        f"| train `ccfm_nolatent` | {_fmt(proj['train_ccfm_nolatent_h'])} |",
        f"| build the scGPT feature cache, {proj['assumptions']['norman_training_cells']:,} cells | "
        f"{_fmt(proj['feature_cache_build_h'])} |",
        f"| generation, {proj['assumptions']['norman_heldout_perturbations']} held-out × "
        f"{proj['assumptions']['cells_per_perturbation']} cells, both variants | "
        f"{_fmt(proj['generation_both_variants_h'])} |",
        f"| **total GPU-bound work, one fold** | **{_fmt(proj['total_gpu_h'])}** |",
        f"| (train `ccfm` with the candidate fix: latent targets on the device, cache warm) | "
        f"{_fmt(proj['train_ccfm_with_candidate_fix_h'])} |",
        "",
    ]
    return lines


def _md_loss(report: Mapping[str, Any], unit: str) -> list[str]:
    lines: list[str] = []
    lc = report["loss_check"]
    lines += [
        f"## Loss on the demo data ({unit})",
        "",
        f"`train_from_files`, {lc['steps']} steps, model {lc['model']}, batch {lc['batch_size']}, lr {lc['lr']}, "
        f"bf16 {'on' if lc['bf16_active'] else 'off'}, latent stream on: mean loss {lc['first_fifth_mean']:.4g} "
        f"(first fifth of the log) -> {lc['last_fifth_mean']:.4g} (last fifth), a drop of "
        f"{100 * lc['relative_drop']:.0f}% (required {100 * lc['required_drop']:.0f}%): "
        f"{'fell' if lc['fell'] else 'DID NOT FALL'}; {_fmt(lc['steps_per_s'])} steps/s.",
        "",
    ]
    return lines


MD_SECTIONS = (
    ("gpu-marked tests", "tests", _md_tests),
    ("Training", "training", _md_training),
    ("scGPT feature extraction", "extraction", _md_extraction),
    ("Generation", "generation", _md_generation),
    ("Projected Norman run", "projection", _md_projection),
    ("Loss on the demo data", "loss_check", _md_loss),
)


def markdown(report: Mapping[str, Any]) -> str:
    env = report["environment"]
    unit = "GPU" if report["mode"] == "gpu" else "CPU"
    lines = ["# GPU check", "", f"**{report['statement']}**", ""]
    if report["mode"] == "gpu":
        lines.append(
            f"GPU: {env.get('gpu_model')} ×{env.get('gpu_count')} ({env.get('gpu_memory_gib')} GiB), driver "
            f"{env.get('driver')}, CUDA {env.get('torch_cuda_build')}, cuDNN {env.get('cudnn')}, "
            f"NCCL {env.get('nccl')}."
        )
    lines += [
        f"torch {env['torch']} (CUDA build {env['torch_cuda_build']}), Python {env['python']}, "
        f"{env['cpu_count']} CPUs ({env['torch_threads']} torch threads), {env['platform']}.",
        f"Commit: `{env['git_commit']}`. Run: {report['created_utc']}, {report.get('seconds_total', 0):.0f} s in all. "
        f"Command: `{report['command']}`.",
        "",
        f"Sizes: {report.get('sizes_summary', 'see plan in the JSON')}.",
        "",
    ]
    for title, key, render in MD_SECTIONS:
        if key == "tests" and key not in report:
            continue
        try:
            lines += render(report, unit)
        except Exception as error:  # the stage failed or did not run: say so, keep the rest
            why = report.get("errors", {}).get(key)
            if why is None:
                why = repr(error) if report.get(key) is not None else "skipped: a stage it needs failed or did not run"
            lines += [f"## {title}", "", f"Not measured: {why}", ""]
    verdict = "All checks passed." if report.get("ok") else "FAILED: " + "; ".join(report.get("failures", []))
    if "ok" not in report:
        verdict = "Incomplete: the check is still running or was stopped (stages written so far are above)."
    lines += ["## Verdict", "", verdict]
    for note in report.get("notes", []):
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def failures_of(report: Mapping[str, Any]) -> list[str]:
    failed = [f"{key} failed: {error}" for key, error in report.get("errors", {}).items()]
    tests = report.get("tests")
    if tests and (tests["returncode"] not in (0, 5) or tests["failed"] or tests["error"]):
        failed.append(f"gpu tests: {tests['summary']}")
    if report["mode"] == "gpu" and tests and tests["passed"] == 0:
        failed.append("no gpu-marked test ran on the GPU")
    comparison = report.get("bf16_vs_fp32")
    if comparison and not comparison["within_tolerance"]:
        failed.append(f"bf16 loss differs from fp32 by {comparison['rel_diff']:.3g}")
    for section, ok in (
        ("training", lambda e: e["losses_finite"] and e["steps_per_s"] > 0),
        ("generation", lambda e: e["finite"] and e["shape_ok"] and e["cells_per_s"] > 0),
    ):
        for key, entry in (report.get(section) or {}).items():
            if not isinstance(entry, dict):
                continue
            if "error" in entry:
                failed.append(f"{section} {key}: {entry['error']}")
            elif not ok(entry):
                failed.append(f"{section} {key}: non-finite values, wrong shape or no progress")
    loss = report.get("loss_check")
    if loss and not loss["finite"]:
        failed.append("demo training loss is not finite")
    if loss and not loss["fell"]:
        failed.append(f"demo training loss fell by only {loss['relative_drop']:.3g}")
    for key in ("training", "extraction", "generation", "loss_check"):
        if report.get(key) is None and key not in report.get("errors", {}):
            failed.append(f"{key} did not run")
    return failed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="where the files go")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the gpu-marked tests")
    parser.add_argument("--tests-timeout", type=float, default=240.0)
    parser.add_argument("--commit", default=os.environ.get("CCFM_COMMIT"), help="git commit to record")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: what the train_ccfm and predict rules give one process)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workdir", type=Path, help="keep intermediate files here (default: a temporary directory)")
    parser.add_argument("--note", action="append", default=[], help="a note for the report (repeatable)")
    parser.add_argument("--norman-train-cells", type=int, default=NORMAN_TRAIN_CELLS)
    parser.add_argument("--norman-heldout", type=int, default=NORMAN_HELDOUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    started = time.perf_counter()
    torch.set_num_threads(max(1, args.threads))
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        print("gpu_check: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = "cuda" if (cuda and args.device != "cpu") else "cpu"
    if device == "cuda":
        statement = f"GPU found: {torch.cuda.get_device_name(0)}; the numbers are GPU numbers at the default sizes"
    elif cuda:
        statement = "CPU mode requested (--device cpu) although a GPU is visible: CPU numbers at tiny sizes"
    else:
        statement = (
            "No CUDA GPU was found on this machine: the same code paths ran on the CPU at tiny sizes, "
            "and every number here is a CPU number (no GPU measurement)"
        )
    print(f"gpu_check: {statement}", flush=True)
    plan = make_plan(device)
    report: dict[str, Any] = {
        "schema": 1,
        "created_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "mode": plan.mode,
        "gpu_found": cuda,
        "statement": statement,
        "numbers_are": "GPU" if plan.mode == "gpu" else "CPU",
        "environment": environment(args.commit),
        "plan": {k: v for k, v in asdict(plan).items() if k != "notes"},
        "notes": [*plan.notes, *args.note],
    }

    def stage(name: str) -> None:
        print(f"gpu_check [{time.perf_counter() - started:6.1f} s] {name}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        """Write what is known so far (a run stopped by a time limit still leaves its results)."""
        (args.out / "gpu_check.json").write_text(json.dumps(_json_ready(report), indent=2) + "\n")
        (args.out / "gpu_check.md").write_text(markdown(report))

    errors: dict[str, str] = {}
    report["errors"] = errors

    def run(key: str, title: str, work: Callable[[], Any]) -> Any:
        """One stage: its result goes to report[key]; an exception is recorded and the run goes on."""
        stage(title)
        try:
            result = work()
        except Exception as error:  # noqa: BLE001 - record, keep measuring what does not depend on it
            errors[key] = f"{type(error).__name__}: {error}"
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            result = None
        write()
        return result

    if not args.skip_tests:
        report["tests"] = run("tests", "gpu-marked tests", lambda: run_gpu_tests(args.tests_timeout))
    workdir = args.workdir
    holder = None if workdir else tempfile.TemporaryDirectory(prefix="ccfm_gpu_check_")
    root = Path(workdir or holder.name)  # type: ignore[union-attr]
    try:
        data = run(
            "dataset",
            "timing dataset (simulate, preprocess, split, gene vocabulary)",
            lambda: prepare_dataset(
                root / "speed", plan.speed_simulate, plan.speed_top_genes, args.seed, plan.map_all_genes
            ),
        )
        if data is not None:
            m, t = plan.model, plan.train
            report["dataset"] = {
                "cells": data.n_cells,
                "genes": data.n_genes,
                "mapped_genes": data.mapped_genes,
                "train_perturbations": len(data.train_labels),
                "heldout_perturbations": len(data.test_labels),
            }
            report["sizes_summary"] = (
                f"{data.n_genes} genes ({data.mapped_genes} in the scGPT vocabulary), {data.n_cells} simulated "
                f"cells; model d_model {m['d_model']}, {m['nlayers']} layers, {m['nhead']} heads; batch "
                f"{t['batch_size']}, window {t['infer_top_gene']} genes; scGPT {plan.scgpt_sizes} "
                f"({plan.scgpt_sizes_source})"
            )
            scgpt_dir = run(
                "scgpt",
                f"scGPT checkpoint {plan.scgpt_sizes}",
                lambda: build_scgpt(root / "speed", plan.scgpt_sizes, args.seed),
            )
            measured = None
            if scgpt_dir is not None:
                measured = run(
                    "extraction",
                    "scGPT extraction, feature cache cold and warm",
                    lambda: measure_extraction(plan, data, scgpt_dir, root / "speed", args.seed),
                )
            if measured is not None:
                report["extraction"], sources, stats = measured
                trained = run(
                    "training",
                    "training steps",
                    lambda: measure_training(plan, data, sources, stats, root / "speed", args.seed),
                )
                if trained is not None:
                    report["training"], report["bf16_vs_fp32"], kept = trained
                    report["generation"] = run(
                        "generation",
                        "generation",
                        lambda: measure_generation(plan, data, kept, root / "speed", args.seed),
                    )
                    del kept, trained
        report["loss_check"] = run("loss_check", "loss on the demo data", lambda: loss_check(plan, root, args.seed))
        if all(report.get(k) is not None for k in ("training", "extraction", "generation")):
            report["projection"] = run(
                "projection",
                "projection",
                lambda: projection(plan, report["training"], report["extraction"], report["generation"], args),
            )
    finally:
        if holder is not None:
            holder.cleanup()
    report["failures"] = failures_of(report)
    report["ok"] = not report["failures"]
    report["seconds_total"] = round(time.perf_counter() - started, 1)
    write()
    stage(f"wrote {args.out / 'gpu_check.json'} and gpu_check.md")
    print(markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
