"""Loading published checkpoints and the engine format; every bad file gets a clear message."""
import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import engine
from engine import CheckpointError, ConfigError
from helpers import CHECKPOINT, golden_cases, golden_tensors, random_mar, rel_err, save




def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        engine.load(tmp_path / "nope.pth")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory without config.json"):
        engine.load(tmp_path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        engine.load(path)


def test_truncated_checkpoint(tmp_path):
    data = CHECKPOINT.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        engine.load(path)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_arbitrary_pickles_are_refused(tmp_path):
    path = save(tmp_path, {"model_ema": {}, "payload": Evil()})
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        engine.load(path)


def test_not_a_mar_checkpoint(tmp_path):
    path = save(tmp_path, {"optimizer": {"lr": 1.0}, "step": 3})
    with pytest.raises(CheckpointError, match="not a model checkpoint: expected 'model'/'model_ema'"):
        engine.load(path)


def test_missing_ema_weights_suggest_ema_false(tmp_path, ckpt):
    path = save(tmp_path, {"model": ckpt["model"], "args": ckpt["args"]})
    with pytest.raises(CheckpointError, match="no 'model_ema' weights .*pass ema=False"):
        engine.load(path)
    assert engine.load(path, ema=False, backend="reference").config.encoder_embed_dim == 64


def test_missing_key(tmp_path, ckpt):
    state = dict(ckpt["model_ema"])
    del state["decoder_norm.weight"]
    path = save(tmp_path, {"model_ema": state, "args": ckpt["args"]})
    with pytest.raises(CheckpointError, match=r"1 missing keys, e.g. \['decoder_norm.weight'\]"):
        engine.load(path)


def test_unexpected_key(tmp_path, ckpt):
    state = dict(ckpt["model_ema"], extra_head=torch.zeros(3))
    path = save(tmp_path, {"model_ema": state, "args": ckpt["args"]})
    with pytest.raises(CheckpointError, match=r"1 unexpected keys, e.g. \['extra_head'\]"):
        engine.load(path)


def test_shapes_contradicting_the_configuration(ckpt, tmp_path):
    path = save(tmp_path, {"model_ema": ckpt["model_ema"], "args": ckpt["args"]})
    with pytest.raises(CheckpointError, match=r"encoder_pos_embed_learned has shape \[1, 80, 64\] "
                                               r"but the configuration .* needs \[1, 272, 64\]"):
        engine.load(path, img_size=256)
    args = argparse.Namespace(**{**vars(ckpt["args"]), "diffloss_w": 128})
    path = save(tmp_path, {"model_ema": ckpt["model_ema"], "args": args}, "w.pth")
    with pytest.raises(CheckpointError, match="diffloss.net.*has shape .*96.* needs .*128"):
        engine.load(path)


def test_head_counts_must_be_given(tmp_path, ckpt):
    args = {k: v for k, v in vars(ckpt["args"]).items() if not k.endswith("num_heads")}
    path = save(tmp_path, {"model_ema": ckpt["model_ema"], "args": argparse.Namespace(**args)})
    with pytest.raises(ConfigError, match="does not give encoder_num_heads.*pass encoder_num_heads=N"):
        engine.load(path)
    model = engine.load(path, encoder_num_heads=4, decoder_num_heads=4, backend="reference")
    assert model.config.decoder_num_heads == 4


def test_bare_state_dict_with_keyword_config(tmp_path, ckpt):
    path = save(tmp_path, dict(ckpt["model_ema"]))
    model = engine.load(path, img_size=128, encoder_num_heads=4, decoder_num_heads=4,
                        num_sampling_steps="50", backend="reference")
    # Sizes the weights determine were inferred from them.
    assert (model.config.diffloss_d, model.config.diffloss_w, model.config.buffer_size) == (2, 96, 16)


def test_unknown_config_keyword():
    with pytest.raises(ConfigError, match="no setting 'colour'"):
        engine.load(CHECKPOINT, colour="red")


def test_preset_names_set_sizes():
    config = engine.MARConfig.from_preset("mar_large")
    assert (config.encoder_embed_dim, config.encoder_depth, config.encoder_num_heads) == (1024, 16, 16)
    assert (config.diffloss_d, config.diffloss_w, config.seq_len, config.token_dim) == (8, 1280, 256, 16)
    with pytest.raises(ConfigError, match="unknown preset 'mar_tiny'"):
        engine.MARConfig.from_preset("mar_tiny")


def test_preset_checkpoint(tmp_path):
    # A published-format checkpoint whose args name a preset and record no sizes.
    mar = random_mar(0, encoder_embed_dim=768, encoder_depth=1, encoder_num_heads=12,
                     decoder_embed_dim=768, decoder_depth=1, decoder_num_heads=12, diffloss_d=1)
    args = argparse.Namespace(model="mar_base", img_size=64, vae_stride=16, patch_size=1,
                              vae_embed_dim=16, class_num=10, buffer_size=4, diffloss_d=1,
                              diffloss_w=48, num_sampling_steps="10")
    path = save(tmp_path, {"model_ema": mar.state_dict(), "args": args})
    model = engine.load(path, backend="reference")
    # Head counts come from the preset; depths (12 in mar_base) from the weights, which have 1.
    assert (model.config.encoder_num_heads, model.config.encoder_depth) == (12, 1)
    with pytest.raises(CheckpointError, match="missing keys"):
        engine.load(path, decoder_depth=2)


def test_convert_round_trip(tmp_path):
    out = engine.convert(CHECKPOINT, tmp_path / "small")
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "engine-mar" and meta["config"]["diffloss_w"] == 96
    converted = engine.load(out, backend="reference")
    original = engine.load(CHECKPOINT, backend="reference")
    for key, value in original.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    case = golden_cases("sample_tokens")[0]
    p = case["params"]
    torch.manual_seed(p["seed"])
    np.random.seed(p["seed"])
    got = converted.sample_tokens(p["bsz"], p["num_iter"], p["cfg"], p["cfg_schedule"],
                                  torch.tensor(p["labels"]), p["temperature"])
    assert rel_err(got, golden_tensors()[f"{case['name']}.tokens"]) <= 1e-4


def test_convert_cli(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "engine", "convert", str(CHECKPOINT), str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()


def test_bad_engine_directories(tmp_path):
    out = engine.convert(CHECKPOINT, tmp_path / "m")
    (out / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        engine.load(out)
    (out / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="is not an engine model config"):
        engine.load(out)
    out2 = engine.convert(CHECKPOINT, tmp_path / "m2")
    data = (out2 / "model.safetensors").read_bytes()
    (out2 / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        engine.load(out2)


def test_unavailable_device_is_named():
    if torch.cuda.is_available():
        return
    with pytest.raises(ConfigError, match="'cuda' requested but no CUDA device is available"):
        engine.load(CHECKPOINT, device="cuda")
    with pytest.raises(ConfigError, match="bad device 'gpu0'"):
        engine.load(CHECKPOINT, device="gpu0")


def test_the_checkout_shadows_no_library_package():
    """Run from the checkout (README's commands, pytest), its top-level directories are importable:
    a top-level kernels/ shadowed Hugging Face's `kernels`, which transformers 5.25 imports when it
    finds one, and every T5 text encoder failed to load. Only engine, csrc (engine.csrc) and the
    tests' and benchmarks' own directories may sit there."""
    from pathlib import Path

    root = Path(engine.__file__).resolve().parent.parent
    packages = {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= {"engine", "csrc"}, packages
    code = ("import importlib.util, sys; s = importlib.util.find_spec('kernels'); "
            "print(s.origin if s else '')")
    found = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                           check=True).stdout.strip()
    # (Hugging Face's own kernels, installed in a venv that may sit inside the checkout, is fine.)
    assert not found.startswith(str(root / "kernels")), found
