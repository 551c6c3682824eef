"""The CPU-testable logic of the CUDA, bf16 and NCCL paths: which device, which backend, when autocast.

The GPU runs themselves are a separate check (a CUDA machine); here torch's CUDA queries and the
process-group start are replaced, so the decisions are tested on any machine.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pytest
import torch

from ccfm import distributed
from ccfm.distributed import DistContext, init_from_env, pick_device


def _gpus(monkeypatch, count: int) -> list[torch.device]:
    """Pretend ``count`` CUDA devices are visible; returns the devices set_device was called with."""
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(torch.device(device)))
    return chosen


def test_pick_device_uses_a_visible_gpu_unless_told_not_to(monkeypatch) -> None:
    _gpus(monkeypatch, 1)
    assert pick_device() == torch.device("cuda") and pick_device(1) == torch.device("cuda")
    assert pick_device(0) == torch.device("cpu")  # train.gpus: 0 keeps a GPU machine on the CPU
    _gpus(monkeypatch, 0)
    assert pick_device() == torch.device("cpu") and pick_device(4) == torch.device("cpu")


@pytest.mark.parametrize(
    ("visible", "backend", "device"),
    [(2, "nccl", torch.device("cuda", 1)), (4, "nccl", torch.device("cuda", 1)), (1, "gloo", torch.device("cpu"))],
)
def test_process_group_uses_nccl_only_with_a_gpu_per_process(monkeypatch, caplog, visible, backend, device) -> None:
    chosen = _gpus(monkeypatch, visible)
    started: list[str] = []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, timeout: started.append(backend))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with caplog.at_level(logging.INFO, logger="ccfm.distributed"):
        context = init_from_env()
    assert started == [backend]
    assert context == DistContext(rank=0, world_size=2, local_rank=1, device=device)
    assert chosen == ([device] if backend == "nccl" else [])  # one GPU per process: its local rank's
    assert f"distributed training: 2 processes, backend {backend}, {visible} GPU(s) visible" in caplog.text
    assert ("training on CPU with gloo" in caplog.text) == (backend == "gloo")


def test_process_group_needs_torchrun_variables(monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="is not set: multi-process training must be started by torchrun"):
        init_from_env()


def _record_autocast(monkeypatch) -> list[dict]:
    calls: list[dict] = []

    def autocast(device_type, dtype=None, enabled=True, **kwargs):
        calls.append({"device_type": device_type, "dtype": dtype, "enabled": enabled})
        return contextlib.nullcontext()

    monkeypatch.setattr(torch, "autocast", autocast)
    return calls


def test_bf16_autocast_is_off_on_cpu_and_changes_nothing(tmp_path, monkeypatch) -> None:
    from ccfm.data.perturbations import PerturbationVocab
    from ccfm.model.expression import load_expression
    from ccfm.model.training import ResumePoint, Trainer, TrainingSet, TrainSettings, build_denoiser
    from training_data import MODEL, SINGLES, write_dataset

    processed, _ = write_dataset(tmp_path)
    data = load_expression(processed)
    vocab = PerturbationVocab.for_genes(data.genes)
    calls = _record_autocast(monkeypatch)
    losses = {}
    for bf16 in (True, False):
        section = {"steps": 3, "batch_size": 8, "warmup_steps": 1, "bf16": bf16, "log_every": 1}
        settings = TrainSettings.from_train_section(section)
        denoiser = build_denoiser(data.n_genes, MODEL, section, 0, vocab, seed=3)
        trainer = Trainer(
            denoiser, TrainingSet(data, SINGLES, vocab), settings, ResumePoint(tmp_path / f"r{bf16}"), seed=3
        )
        losses[bf16] = [trainer.train_step()["total"] for _ in range(3)]
    # bf16: true asks for bfloat16 autocast, which is enabled on CUDA only.
    assert calls and all(c["device_type"] == "cpu" and c["dtype"] == torch.bfloat16 for c in calls)
    assert not any(c["enabled"] for c in calls)
    np.testing.assert_array_equal(losses[True], losses[False])


def test_scgpt_bf16_autocast_is_cuda_only(tiny_scgpt_checkpoint) -> None:
    from ccfm.scgpt.extractor import ExtractorSettings, ScGPTFeatureExtractor
    from scgpt_test_data import random_vocab_ids

    extractor = ScGPTFeatureExtractor(
        tiny_scgpt_checkpoint(seed=2),
        random_vocab_ids(12, seed=3),
        settings=ExtractorSettings(autocast_bf16=True, max_tokens_per_cell=None, zero_tokens=False),
    )
    assert extractor.device.type == "cpu" and extractor.autocast_bf16 is False
