"""CCFM speed: training steps/s, inference cells/s and the share of scGPT feature extraction.

Two sizes, fixed here (the shipped demo is smaller still: d_model 32, 2 heads, batch 16):

- ``demo``: a small CPU model (d_model 64, 2 layers, batch 32, 256-gene window, ~200 genes) with the
  ``tiny`` scGPT (width 32, 2 layers);
- ``default``: the schema's defaults (d_model 128, 4 layers, batch 48, 1000-gene window of 5000 genes)
  with a randomly initialised scGPT of the whole-human architecture (width 512, 12 layers, 8 heads),
  fed cells with ~1000 expressed genes of 5000 (scGPT cost grows with expressed genes per cell).

Timings use synthetic tensors of the right shapes (weights do not change the cost). A training
step is the full optimiser step of :class:`ccfm.model.training.Trainer` minus data loading; the scGPT
share is extraction time / (extraction + step) with the feature cache off (with the cache on,
extraction becomes a memory-mapped read). Inference runs the real two-stage sampler over all
genes; where a full run would take too long on CPU (``default``) one ODE function evaluation is
timed and multiplied by the number of evaluations rk4 makes (4 per step per stage).

Usage: ``python benchmarks/ccfm_speed.py [--sizes demo default] [--threads 2] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ccfm.model.denoiser import CascadedDenoiser, FlowSettings, FlowStart, Integration
from ccfm.model.model import CascadedFlowModel, ModelConfig


@dataclass
class Size:
    name: str
    n_genes: int  # genes of processed.h5ad (inference runs over all of them)
    window: int  # train.infer_top_gene
    batch: int
    d_model: int
    nhead: int
    nlayers: int
    scgpt_width: int
    scgpt_layers: int
    scgpt_heads: int
    expressed_per_cell: int
    latent_steps: int
    expr_steps: int
    gen_batch: int
    full_generation: bool  # run generate() for real, or time one evaluation and extrapolate


SIZES = {
    "demo": Size("demo", 201, 256, 32, 64, 4, 2, 32, 2, 4, 126, 8, 8, 64, True),
    "default": Size("default", 5000, 1000, 48, 128, 8, 4, 512, 12, 8, 1000, 20, 20, 4, False),
}


def _denoiser(size: Size, latent_dim: int) -> CascadedDenoiser:
    torch.manual_seed(0)
    config = ModelConfig(
        n_genes=size.n_genes,
        d_model=size.d_model,
        nhead=size.nhead,
        nlayers=size.nlayers,
        latent_dim=latent_dim,
        bottleneck=128,
    )
    return CascadedDenoiser(CascadedFlowModel(config), FlowSettings())


def _batch(size: Size, latent_dim: int, generator: torch.Generator):
    window = min(size.window, size.n_genes)
    gene_ids = torch.randperm(size.n_genes, generator=generator)[:window].sort().values.expand(size.batch, -1)
    source = torch.rand(size.batch, window, generator=generator) * 3
    target = torch.rand(size.batch, window, generator=generator) * 3
    pert = torch.randint(0, size.n_genes, (size.batch, 2), generator=generator)
    z = torch.randn(size.batch, window, latent_dim, generator=generator) if latent_dim else None
    return gene_ids, source, target, pert, z


def time_training(size: Size, latent_dim: int, steps: int) -> float:
    """Seconds per optimiser step (after one warm-up step)."""
    den = _denoiser(size, latent_dim)
    opt = torch.optim.AdamW(den.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    batch = _batch(size, latent_dim, gen)
    durations = []
    for i in range(steps + 1):
        started = time.perf_counter()
        loss = den.loss(*batch[:3], batch[3], batch[4], gen)["total"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(den.parameters(), 1.0)
        opt.step()
        if i:
            durations.append(time.perf_counter() - started)
    return float(np.median(durations))


def time_extraction(size: Size, workdir: Path, cells: int) -> tuple[float, int]:
    """Seconds to extract scGPT features of one training batch (on the fly), and D."""
    from ccfm.scgpt.checkpoint import build_tiny_checkpoint
    from ccfm.scgpt.extractor import ExtractorSettings, ScGPTFeatureExtractor

    model_dir = build_tiny_checkpoint(
        workdir / f"scgpt_{size.name}",
        seed=0,
        embsize=size.scgpt_width,
        nlayers=size.scgpt_layers,
        nheads=size.scgpt_heads,
        d_hid=size.scgpt_width,
    )
    rng = np.random.default_rng(0)
    vocab_ids = rng.choice(60000, size=size.n_genes, replace=False).astype(np.int64)
    extractor = ScGPTFeatureExtractor(
        model_dir, vocab_ids, "cpu", settings=ExtractorSettings(max_tokens_per_cell=1200, seed=0, zero_tokens=False)
    )
    expr = np.zeros((cells, size.n_genes), dtype=np.float32)
    for row in expr:
        row[rng.choice(size.n_genes, size.expressed_per_cell, replace=False)] = rng.gamma(
            2.0, 1.0, size.expressed_per_cell
        )
    extractor.extract(expr[:1])  # warm-up
    started = time.perf_counter()
    extractor.extract(expr)
    per_cell = (time.perf_counter() - started) / cells
    return per_cell * size.batch, extractor.dim


def time_inference(size: Size, latent_dim: int) -> dict[str, float]:
    """Generated cells per second over all genes with the configured rk4 steps."""
    den = _denoiser(size, latent_dim).eval()
    gen = torch.Generator().manual_seed(1)
    b = size.gen_batch
    gene_ids = torch.arange(size.n_genes).expand(b, -1)
    source = torch.rand(b, size.n_genes, generator=gen) * 3
    pert = torch.randint(0, size.n_genes, (b, 2), generator=gen)
    evaluations = 4 * ((size.latent_steps - 1 if latent_dim else 0) + size.expr_steps - 1)
    if size.full_generation:
        den.generate(gene_ids[:2], source[:2], pert[:2], Integration(2, 2, "rk4"), FlowStart(gen))  # warm-up
        started = time.perf_counter()
        den.generate(gene_ids, source, pert, Integration(size.latent_steps, size.expr_steps, "rk4"), FlowStart(gen))
        seconds = time.perf_counter() - started
        return {"cells_per_s": b / seconds, "seconds_per_batch": seconds, "measured": 1.0, "evaluations": evaluations}
    x = torch.randn(b, size.n_genes, generator=gen)
    z = torch.randn(b, size.n_genes, latent_dim, generator=gen) if latent_dim else None
    t = torch.full((b,), 0.5)
    with torch.no_grad():
        den.velocities(gene_ids[:1], source[:1], x[:1], None if z is None else z[:1], t[:1], t[:1], pert[:1])
        started = time.perf_counter()
        den.velocities(gene_ids, source, x, z, t, t, pert)
        per_eval = time.perf_counter() - started
    seconds = per_eval * evaluations
    return {"cells_per_s": b / seconds, "seconds_per_batch": seconds, "measured": 0.0, "evaluations": evaluations}


def run(size: Size, train_steps: int, extract_cells: int, workdir: Path) -> dict[str, object]:
    print(f"[{size.name}] scGPT extraction ...", file=sys.stderr, flush=True)
    extract_s, dim = time_extraction(size, workdir, extract_cells)
    out: dict[str, object] = {"size": size.__dict__, "scgpt_dim": dim, "extract_s_per_batch": extract_s}
    for variant, latent_dim in (("ccfm", dim), ("ccfm_nolatent", 0)):
        print(f"[{size.name}] {variant}: training ...", file=sys.stderr, flush=True)
        step_s = time_training(size, latent_dim, train_steps)
        entry: dict[str, float] = {"step_s": step_s, "steps_per_s": 1 / step_s}
        if latent_dim:
            entry["steps_per_s_with_scgpt"] = 1 / (step_s + extract_s)
            entry["scgpt_share"] = extract_s / (step_s + extract_s)
        print(f"[{size.name}] {variant}: inference ...", file=sys.stderr, flush=True)
        entry.update({f"infer_{k}": v for k, v in time_inference(size, latent_dim).items()})
        out[variant] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["demo", "default"], choices=sorted(SIZES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--extract-cells", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"torch": torch.__version__, "threads": args.threads, "device": "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sizes:
            results[name] = run(SIZES[name], args.train_steps, args.extract_cells, Path(tmp))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
