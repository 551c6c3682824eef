"""Kill-and-resume of training: SIGKILL a training process past its last checkpoint, rerun, compare.

The killed process is a real ``ccfm.model.training.train_from_files`` run (the train_ccfm rule's code
path) in a child interpreter. To kill it at a known point *after* a checkpoint, the child's
``Trainer.train_step`` is wrapped to report each finished step and to hold still after
``KILL_AFTER_STEP``, so the in-memory state is ahead of ``resume/checkpoint.pt`` when SIGKILL
arrives (the steps since the checkpoint are lost, as in a preempted job). A new process then
runs the same configuration to completion; on CPU it must end bit-identical to a run that was
never interrupted.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from ccfm.model.checkpoint import load_model
from ccfm.model.training import CHECKPOINT_NAME, TrainRequest, train_from_files
from training_data import MODEL, write_dataset

TRAIN = {
    "steps": 40,
    "batch_size": 16,
    "lr": 3e-3,
    "warmup_steps": 5,
    "infer_top_gene": 12,
    "checkpoint_every": 10,
    "log_every": 5,
}
SEED = 7
KILL_AFTER_STEP = 25  # checkpoints at 10 and 20: the killed process is 5 steps past the last one
LAST_CHECKPOINT = 20

# The child: one training run with the given keyword arguments, single-threaded like the test
# process (bit-identity across processes needs the same reduction order). With a pause step it
# marks each finished step in a file and sleeps after that step until it is killed.
CHILD = """
import json, logging, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from ccfm.model import training

request = json.loads(sys.argv[1])
pause_after, marker = request.pop("pause_after_step"), request.pop("step_marker")
if pause_after is not None:
    finish_step = training.Trainer.train_step

    def train_step(self):
        values = finish_step(self)
        Path(marker).write_text(str(self.step))
        if self.step == pause_after:
            time.sleep(600)
        return values

    training.Trainer.train_step = train_step
result = training.train_from_files(training.TrainRequest(**request), device="cpu", progress=False)
print(json.dumps({"resumed_from": result.resumed_from, "steps_run": result.steps_run}))
"""


def _request(processed: Path, split: Path, out: Path) -> dict:
    return {
        "processed_h5ad": str(processed),
        "split_json": str(split),
        "out_model": str(out / "model.pt"),
        "out_loss": str(out / "loss.tsv"),
        "resume_dir": str(out / "resume"),
        "model_section": MODEL,
        "train_section": TRAIN,
        "latent_section": {},
        "seed": SEED,
        "use_latent": False,
    }


def _child_command(script: Path, request: dict, pause_after_step: int | None, marker: Path) -> list[str]:
    payload = {**request, "pause_after_step": pause_after_step, "step_marker": str(marker)}
    return [sys.executable, str(script), json.dumps(payload)]


def _marked_step(marker: Path) -> int:
    text = marker.read_text() if marker.exists() else ""
    return int(text) if text.strip() else 0


@pytest.mark.slow  # subprocess
def test_sigkill_after_checkpoint_then_rerun_matches_uninterrupted_training(tmp_path: Path) -> None:
    processed, split = write_dataset(tmp_path)
    script = tmp_path / "train_child.py"
    script.write_text(CHILD)
    out = tmp_path / "run"
    request = _request(processed, split, out)
    checkpoint = out / "resume" / CHECKPOINT_NAME
    marker = tmp_path / "step.txt"
    env_log = tmp_path / "killed.log"

    with env_log.open("w") as log:
        child = subprocess.Popen(_child_command(script, request, KILL_AFTER_STEP, marker), stdout=log, stderr=log)
        deadline = time.monotonic() + 120
        # Wait until the checkpoint exists *and* training has gone past it.
        while not (checkpoint.exists() and _marked_step(marker) >= KILL_AFTER_STEP):
            assert child.poll() is None, (
                f"training child exited ({child.returncode}) before the kill:\n{env_log.read_text()}"
            )
            assert time.monotonic() < deadline, "training child made no progress in 120 s"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL  # killed, not finished
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["step"] == LAST_CHECKPOINT < KILL_AFTER_STEP < TRAIN["steps"]
    # Nothing that looks like a finished run, and no temporary files, is left behind.
    assert sorted(p.name for p in out.iterdir()) == ["resume"]
    assert sorted(p.name for p in (out / "resume").iterdir()) == [CHECKPOINT_NAME]

    resumed = subprocess.run(
        _child_command(script, request, None, marker), capture_output=True, text=True, timeout=300, check=False
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert report == {"resumed_from": LAST_CHECKPOINT, "steps_run": TRAIN["steps"] - LAST_CHECKPOINT}
    assert f"at step {LAST_CHECKPOINT}" in resumed.stderr and "resumed from" in resumed.stderr

    reference_out = tmp_path / "uninterrupted"
    reference = train_from_files(
        TrainRequest(
            **_request(processed, split, reference_out),
        ),
        device="cpu",
        progress=False,
    )
    assert reference.resumed_from == 0 and reference.steps_run == TRAIN["steps"]
    final = load_model(out / "model.pt").denoiser.model.state_dict()
    expected = load_model(reference_out / "model.pt").denoiser.model.state_dict()
    assert list(final) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name
    assert (out / "loss.tsv").read_text() == (reference_out / "loss.tsv").read_text()
    assert pd.read_csv(out / "loss.tsv", sep="\t")["step"].tolist() == list(range(5, TRAIN["steps"] + 1, 5))
