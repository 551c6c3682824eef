"""The training and generation paths on a CUDA device: bf16 autocast, generation, NCCL and DDP.

Every test is marked ``gpu`` and skipped where torch sees no CUDA device (tests/conftest.py);
``bash benchmarks/gpu_check.sh`` runs them first on a GPU machine.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist

from ccfm.data.perturbations import PerturbationVocab
from ccfm.model.checkpoint import load_model, save_model
from ccfm.model.expression import load_expression
from ccfm.model.generation import GenerateSettings, predict_label, read_control_cells
from ccfm.model.training import (
    ResumePoint,
    Trainer,
    TrainingSet,
    TrainRequest,
    TrainSettings,
    build_denoiser,
    train_distributed,
    train_from_files,
)
from training_data import MODEL, FakeLatent, write_dataset

pytestmark = pytest.mark.gpu

TRAIN = {
    "steps": 12,
    "batch_size": 16,
    "lr": 2e-3,
    "warmup_steps": 2,
    "infer_top_gene": 12,
    "checkpoint_every": 6,
    "log_every": 3,
    "mmd": True,
    "gamma": 0.5,
}


def _trainer(processed: Path, split: Path, resume: Path, *, latent_dim: int, bf16: bool, device: str) -> Trainer:
    data = load_expression(processed)
    labels = json.loads(split.read_text())["train"]
    vocab = PerturbationVocab.for_genes(data.genes)
    section = {**TRAIN, "bf16": bf16}
    denoiser = build_denoiser(data.n_genes, MODEL, section, latent_dim, vocab, seed=5)
    return Trainer(
        denoiser,
        TrainingSet(data, labels, vocab, latent_targets=FakeLatent(latent_dim) if latent_dim else None),
        TrainSettings.from_train_section(section),
        ResumePoint(resume),
        seed=5,
        device=device,
    )


def _linear_output_dtypes(trainer: Trainer) -> list[torch.dtype]:
    """Record the output dtype of every nn.Linear during the next forward pass."""
    seen: list[torch.dtype] = []
    for module in trainer.denoiser.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_bf16_training_step_autocasts_and_matches_fp32(tmp_path) -> None:
    processed, split = write_dataset(tmp_path)
    fp32 = _trainer(processed, split, tmp_path / "a", latent_dim=4, bf16=False, device="cuda")
    bf16 = _trainer(processed, split, tmp_path / "b", latent_dim=4, bf16=True, device="cuda")
    fp32_dtypes, bf16_dtypes = _linear_output_dtypes(fp32), _linear_output_dtypes(bf16)
    # identically seeded: same weights, same batch, same flow-matching noise at the first step
    loss_fp32, loss_bf16 = fp32.train_step(), bf16.train_step()
    assert set(fp32_dtypes) == {torch.float32}
    assert torch.bfloat16 in set(bf16_dtypes), "train.bf16 must autocast the model's matrix products on CUDA"
    for name in ("total", "expr", "latent"):
        assert np.isfinite(loss_bf16[name])
        assert loss_bf16[name] == pytest.approx(loss_fp32[name], rel=0.02), name
    for parameter in bf16.denoiser.parameters():
        assert parameter.dtype == torch.float32 and parameter.device.type == "cuda"
        assert torch.isfinite(parameter).all()
    history = bf16.run(progress=False).history
    assert len(history) == TRAIN["steps"] // TRAIN["log_every"]
    assert np.isfinite(np.asarray(history)).all()


def _trained_model(tmp_path: Path, device: str, latent_dim: int) -> tuple[Path, Path, Path]:
    processed, split = write_dataset(tmp_path)
    if latent_dim:
        trainer = _trainer(processed, split, tmp_path / "r", latent_dim=latent_dim, bf16=True, device=device)
        trainer.run(progress=False)
        save_model(tmp_path / "model.pt", trainer.denoiser, trainer.vocab)
    else:
        train_from_files(
            TrainRequest(
                processed_h5ad=processed,
                split_json=split,
                out_model=tmp_path / "model.pt",
                out_loss=tmp_path / "loss.tsv",
                resume_dir=tmp_path / "resume",
                model_section=MODEL,
                train_section=TRAIN,
                latent_section={},
                seed=3,
                use_latent=False,
            ),
            device=device,
            progress=False,
        )
    return tmp_path / "model.pt", processed, split


def test_generation_on_cuda_matches_cpu_for_the_anchored_flow(tmp_path) -> None:
    # ccfm_nolatent with the control-anchored flow draws no noise: CUDA and CPU integrate the same ODE
    model_pt, processed, split = _trained_model(tmp_path, "cuda", latent_dim=0)
    controls = read_control_cells(processed)
    rows = np.arange(controls.matrix.shape[0])
    label = json.loads(split.read_text())["test"][0]
    settings = GenerateSettings(cells_per_perturbation=24, method="rk4", latent_steps=20, expr_steps=20, batch_size=16)
    on = {
        device: predict_label(load_model(model_pt, device), controls, rows, label, settings, 9, torch.device(device))
        for device in ("cpu", "cuda")
    }
    assert on["cuda"].shape == (24, controls.n_genes)
    np.testing.assert_allclose(on["cuda"], on["cpu"], rtol=1e-3, atol=1e-3)


def test_two_stage_generation_on_cuda(tmp_path) -> None:
    model_pt, processed, split = _trained_model(tmp_path, "cuda", latent_dim=4)
    model = load_model(model_pt, "cuda")
    assert model.denoiser.latent_enabled
    controls = read_control_cells(processed)
    label = json.loads(split.read_text())["test"][0]
    settings = GenerateSettings(cells_per_perturbation=20, method="rk4", latent_steps=20, expr_steps=20, batch_size=8)
    rows = np.arange(controls.matrix.shape[0])
    first = predict_label(model, controls, rows, label, settings, 9, torch.device("cuda"))
    again = predict_label(model, controls, rows, label, settings, 9, torch.device("cuda"))
    assert first.shape == (20, controls.n_genes)
    assert np.isfinite(first).all() and (first >= 0).all()
    np.testing.assert_allclose(first, again, rtol=1e-5, atol=1e-5)  # seeded per label: reproducible


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_nccl_process_group_on_one_gpu(monkeypatch) -> None:
    from ccfm.distributed import init_from_env, shutdown, sum_over_ranks

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    context = init_from_env()
    try:
        assert dist.get_backend() == "nccl" and context.device == torch.device("cuda", 0)
        assert sum_over_ranks([1.5, -2.0], context.device) == [1.5, -2.0]
        tensor = torch.arange(4.0, device=context.device)
        dist.all_reduce(tensor)
        assert tensor.tolist() == [0.0, 1.0, 2.0, 3.0]
    finally:
        shutdown()


@pytest.mark.slow  # torchrun workers
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="DDP over NCCL needs 2 or more GPUs (one process per GPU)",
)
def test_ddp_over_nccl_one_process_per_gpu(tmp_path) -> None:
    gpus = torch.cuda.device_count()
    processed, split = write_dataset(tmp_path)
    log_path = tmp_path / "train.log"
    train_distributed(
        gpus,
        log_path,
        TrainRequest(
            processed_h5ad=str(processed),
            split_json=str(split),
            out_model=str(tmp_path / "model.pt"),
            out_loss=str(tmp_path / "loss.tsv"),
            resume_dir=str(tmp_path / "resume"),
            model_section=MODEL,
            train_section={**TRAIN, "batch_size": gpus * max(1, 16 // gpus)},
            latent_section={},
            seed=3,
            use_latent=False,
        ),
        threads_per_process=1,
    )
    text = log_path.read_text()
    assert f"distributed training: {gpus} processes, backend nccl" in text, text[-2000:]
    assert "training on CPU with gloo" not in text
    loss = pd.read_csv(tmp_path / "loss.tsv", sep="\t")
    assert len(loss) == TRAIN["steps"] // TRAIN["log_every"] and np.isfinite(loss["total"]).all()
    assert load_model(tmp_path / "model.pt").metadata["steps"] == TRAIN["steps"]
