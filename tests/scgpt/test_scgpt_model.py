"""scGPT import workaround, tiny checkpoint, strict loading and the flash-attn name conversion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ccfm.scgpt.checkpoint import (
    CheckpointError,
    build_model,
    build_tiny_checkpoint,
    load_scgpt,
    read_args,
    to_flash_attention_names,
    to_pytorch_attention_names,
)
from ccfm.scgpt.compat import census_vocab_path, scgpt_package_dir, transformer_model_class
from scgpt_test_data import copy_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tiny_scgpt_checkpoint) -> Path:
    return tiny_scgpt_checkpoint(seed=7)


@pytest.mark.slow  # subprocess
def test_import_workaround_skips_package_init_in_a_fresh_interpreter():
    code = (
        "import sys, ccfm.scgpt.compat as c\n"
        "T = c.transformer_model_class()\n"
        "print(T.__module__, T.__name__)\n"
        "print('torchtext' in sys.modules, hasattr(sys.modules['scgpt'], 'logger'))\n"
        "print(sys.modules['scgpt.model.model'].__file__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "scgpt.model.model TransformerModel"
    # scgpt/__init__.py (which imports torchtext and defines `logger`) never ran
    assert lines[1] == "False False"
    assert Path(lines[2]) == scgpt_package_dir() / "model" / "model.py"


def test_real_census_vocab_is_read_from_the_wheel():
    vocab = json.loads(census_vocab_path().read_text())
    assert len(vocab) == 60694
    assert sorted(vocab.values()) == list(range(60694))
    assert "GAPDH" in vocab


def test_tiny_checkpoint_has_the_published_layout(tiny_dir, scgpt_pretraining_args):
    args = json.loads((tiny_dir / "args.json").read_text())
    real = json.loads(Path(scgpt_pretraining_args).read_text())
    assert set(args) == set(real)
    assert (args["embsize"], args["nlayers"], args["nheads"], args["d_hid"]) == (32, 2, 4, 64)
    for key in ("input_style", "input_emb_style", "n_bins", "pad_value", "pad_token", "MVC"):
        assert args[key] == real[key]
    vocab = json.loads((tiny_dir / "vocab.json").read_text())
    assert (vocab["<pad>"], vocab["<cls>"], vocab["<eoc>"]) == (60694, 60695, 60696)
    state = torch.load(tiny_dir / "best_model.pt", weights_only=True)
    assert "transformer_encoder.layers.0.self_attn.Wqkv.weight" in state
    assert not any("in_proj" in key for key in state)
    assert "flag_encoder.weight" in state and not any(k.startswith("cls_decoder.") for k in state)
    assert state["encoder.embedding.weight"].shape == (60697, 32)


def test_tiny_checkpoint_is_deterministic_in_the_seed(tmp_path, tiny_dir):
    rng_before = torch.random.get_rng_state()
    again = torch.load(build_tiny_checkpoint(tmp_path / "a", seed=7) / "best_model.pt", weights_only=True)
    other = torch.load(build_tiny_checkpoint(tmp_path / "b", seed=8) / "best_model.pt", weights_only=True)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    first = torch.load(tiny_dir / "best_model.pt", weights_only=True)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["encoder.embedding.weight"], other["encoder.embedding.weight"])


def test_load_is_strict_frozen_and_reproduces_the_saved_weights(tiny_dir):
    model, vocab, args = load_scgpt(tiny_dir)
    assert isinstance(model, transformer_model_class())
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    saved = to_pytorch_attention_names(torch.load(tiny_dir / "best_model.pt", weights_only=True))
    loaded = model.state_dict()
    for key, value in saved.items():
        if key in loaded:
            assert torch.equal(loaded[key], value), key
    assert torch.equal(
        loaded["transformer_encoder.layers.1.self_attn.in_proj_weight"],
        saved["transformer_encoder.layers.1.self_attn.in_proj_weight"],
    )
    assert len(vocab) == 60697 and args["embsize"] == 32


def test_flash_format_checkpoint_gives_the_same_encoder_output(tmp_path):
    """A model saved with fused Wqkv names loads into PyTorch attention and computes the same thing."""
    args = read_args(build_tiny_checkpoint(tmp_path / "ref", seed=1) / "args.json")
    vocab = json.loads((tmp_path / "ref" / "vocab.json").read_text())
    torch.manual_seed(3)
    original = build_model(args, vocab).eval()
    flash_state = to_flash_attention_names(original.state_dict())
    assert sum(".Wqkv." in k for k in flash_state) == 2 * args["nlayers"]
    ckpt = copy_checkpoint(tmp_path / "ref", tmp_path / "flash")
    torch.save(flash_state, ckpt / "best_model.pt")
    loaded, _, _ = load_scgpt(ckpt)
    src = torch.tensor([[60695, 5, 17, 60694], [60695, 9, 60694, 60694]])
    values = torch.tensor([[-2.0, 3.0, 7.0, -2.0], [-2.0, 1.0, -2.0, -2.0]])
    mask = src == 60694
    with torch.inference_mode():
        expected = original._encode(src, values, mask)
        got = loaded._encode(src, values, mask)
    torch.testing.assert_close(got[~mask], expected[~mask], rtol=0, atol=1e-6)


def test_missing_and_unexpected_keys_are_errors_naming_them(tmp_path, tiny_dir):
    state = torch.load(tiny_dir / "best_model.pt", weights_only=True)
    broken = copy_checkpoint(tiny_dir, tmp_path / "missing")
    torch.save(
        {k: v for k, v in state.items() if k != "transformer_encoder.layers.1.linear2.bias"}, broken / "best_model.pt"
    )
    with pytest.raises(CheckpointError, match="transformer_encoder.layers.1.linear2.bias"):
        load_scgpt(broken)
    extra = copy_checkpoint(tiny_dir, tmp_path / "extra")
    torch.save({**state, "value_encoder.surprise.weight": torch.zeros(2)}, extra / "best_model.pt")
    with pytest.raises(CheckpointError, match="value_encoder.surprise.weight"):
        load_scgpt(extra)


def test_args_that_do_not_match_the_weights_are_an_error(tmp_path, tiny_dir):
    wrong = copy_checkpoint(tiny_dir, tmp_path / "wrong")
    args = json.loads((wrong / "args.json").read_text())
    args["embsize"], args["nheads"] = 64, 4
    (wrong / "args.json").write_text(json.dumps(args))
    with pytest.raises(CheckpointError, match="do not belong together"):
        load_scgpt(wrong)
    args["embsize"], args["nlayers"] = 32, 3
    (wrong / "args.json").write_text(json.dumps(args))
    # The tiny checkpoint has 2 layers: the error names the field, its value and what the weights hold.
    named = r"best_model\.pt has 2 transformer layers but args\.json nlayers=3(?!\d)"
    with pytest.raises(CheckpointError, match=named):
        load_scgpt(wrong)


def test_missing_file_and_pickled_objects_are_refused(tmp_path, tiny_dir):
    partial = copy_checkpoint(tiny_dir, tmp_path / "partial")
    (partial / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match="lacks vocab.json"):
        load_scgpt(partial)
    pickled = copy_checkpoint(tiny_dir, tmp_path / "pickled")
    torch.save({"weights": Path("x")}, pickled / "best_model.pt")  # an arbitrary Python object
    with pytest.raises(CheckpointError, match="weights-only"):
        load_scgpt(pickled)
