"""Probes from the reliability issue: thread-safe loading, non-finite weights, typed configuration,
size limits checked before anything is allocated, and honest CI settings. Each probe asserts the
error type and what its message names."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine
from conftest import rel_err as conftest_rel_err
from engine import CheckpointError, ConfigError, MARConfig
from engine.core.config import (MAX_DEPTH, MAX_PARAMS, MAX_WIDTH, PRESETS, coerce_fields,
                           estimate_params)
from engine.models.mar import MAR
from helpers import CHECKPOINT, save

ROOT = Path(__file__).resolve().parents[1]




def with_args(ckpt, **changes):
    return {"model_ema": dict(ckpt["model_ema"]),
            "args": argparse.Namespace(**{**vars(ckpt["args"]), **changes})}


# 1. Thread-safe loading ------------------------------------------------------------------------

def test_concurrent_loads_all_succeed():
    errors, done = [], []

    def work():
        for _ in range(3):
            try:
                model = engine.load(CHECKPOINT, backend="reference")
                done.append(model.config.encoder_embed_dim)
            except Exception as err:  # noqa: BLE001 - every failure is reported below
                errors.append(repr(err))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert done == [64] * 24


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_foreign_pickles_still_refused_after_loads(tmp_path, ckpt):
    engine.load(CHECKPOINT, backend="reference")  # the Namespace allowance is registered now
    path = save(tmp_path, {"model_ema": dict(ckpt["model_ema"]), "args": ckpt["args"],
                           "payload": Evil()})
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        engine.load(path)
    vae_path = save(tmp_path, {"state_dict": {}, "payload": Evil()}, "vae.ckpt")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        engine.load_vae(vae_path)


# 2. Non-finite weights ------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weights_in_pth(tmp_path, ckpt, bad):
    obj = with_args(ckpt)
    weight = obj["model_ema"]["decoder_norm.weight"].clone()
    weight[:2] = bad
    obj["model_ema"]["decoder_norm.weight"] = weight
    path = save(tmp_path, obj)
    with pytest.raises(CheckpointError, match=r"'decoder_norm.weight' holds 2 non-finite values"):
        engine.load(path)
    with pytest.raises(CheckpointError, match="decoder_norm.weight"):
        engine.convert(path, tmp_path / "out")


def test_nonfinite_weights_in_engine_directory(tmp_path):
    out = engine.convert(CHECKPOINT, tmp_path / "m")
    state = load_file(str(out / "model.safetensors"))
    key = "diffloss.net.input_proj.weight"
    state[key] = state[key].clone()
    state[key][0, 0] = float("nan")
    state[key][1, 1] = float("inf")
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"'{key}' holds 2 non-finite values \(NaN or Inf\)"):
        engine.load(out)


def test_nonfinite_vae_weights(tmp_path):
    from engine.decoders.vae import KLDecoder

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in KLDecoder().state_dict().items()}
    sd = {k: torch.zeros(s) for k, s in shapes.items()}
    sd["decoder.conv_out.bias"][1] = float("nan")
    path = save(tmp_path, {"state_dict": sd}, "kl16.ckpt")
    with pytest.raises(CheckpointError, match=r"'decoder.conv_out.bias' holds 1 non-finite"):
        engine.load_vae(path)


# 3. Typed configuration -----------------------------------------------------------------------

def test_args_that_are_not_a_namespace(tmp_path, ckpt):
    path = save(tmp_path, {"model_ema": dict(ckpt["model_ema"]), "args": [1, 2, 3]})
    with pytest.raises(CheckpointError, match="'args' is a list, expected the run's argparse.Namespace"):
        engine.load(path)


@pytest.mark.parametrize("path", [None, 123, 1.5, b"ckpt.pth"])
def test_load_needs_a_path(path):
    with pytest.raises(CheckpointError, match="expected a path or built-in name"):
        engine.load(path)


def test_clip_denoised_strings_in_args(tmp_path, ckpt):
    path = save(tmp_path, with_args(ckpt, clip_denoised="False"))
    assert engine.load(path, backend="reference").config.clip_denoised is False
    path = save(tmp_path, with_args(ckpt, clip_denoised="TRUE"), "t.pth")
    assert engine.load(path, backend="reference").config.clip_denoised is True
    path = save(tmp_path, with_args(ckpt, clip_denoised="maybe"), "m.pth")
    with pytest.raises(ConfigError, match="clip_denoised must be a boolean.*'maybe'"):
        engine.load(path)


def test_clip_denoised_strings_in_config_json(tmp_path):
    out = engine.convert(CHECKPOINT, tmp_path / "m")
    meta = json.loads((out / "config.json").read_text())
    for text, want in (("False", False), ("no", False), ("yes", True), ("1", True)):
        meta["config"]["clip_denoised"] = text
        (out / "config.json").write_text(json.dumps(meta))
        assert engine.load(out, backend="reference").config.clip_denoised is want, text
    meta["config"]["clip_denoised"] = "maybe"
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="config.json: config field clip_denoised.*'maybe'"):
        engine.load(out)


def test_clip_denoised_keyword():
    assert engine.load(CHECKPOINT, clip_denoised="False", backend="reference").config.clip_denoised is False
    assert engine.load(CHECKPOINT, clip_denoised=1, backend="reference").config.clip_denoised is True
    for bad in ("maybe", 2, 0.5, [True]):
        with pytest.raises(ConfigError, match="clip_denoised must be a boolean"):
            engine.load(CHECKPOINT, clip_denoised=bad)


def test_numbers_parsed_to_their_declared_types():
    config = engine.load(CHECKPOINT, mlp_ratio="4", buffer_size="16", class_num=10.0,
                         num_sampling_steps=50, clip_range=["-1", 1], backend="reference").config
    assert config.mlp_ratio == 4.0 and type(config.mlp_ratio) is float
    assert config.buffer_size == 16 and type(config.buffer_size) is int
    assert config.class_num == 10 and type(config.class_num) is int
    assert config.num_sampling_steps == "50" and config.clip_range == (-1.0, 1.0)


@pytest.mark.parametrize("name, value, message", [
    ("encoder_depth", 4.5, "encoder_depth must be an integer, got 4.5"),
    ("encoder_depth", "x", "encoder_depth must be an integer, got 'x'"),
    ("encoder_depth", True, r"encoder_depth must be an integer \(not a boolean\), got True"),
    ("encoder_depth", float("inf"), "encoder_depth must be an integer, got inf"),
    ("diffloss_w", None, "diffloss_w must be an integer, got None"),
    ("mlp_ratio", "four", "mlp_ratio must be a number, got 'four'"),
    ("mlp_ratio", float("nan"), "mlp_ratio must be a finite number, got nan"),
    ("mlp_ratio", False, r"mlp_ratio must be a number \(not a boolean\)"),
    ("clip_range", (0.0, 1.0, 2.0), "clip_range must be a list or tuple of two numbers"),
    ("clip_range", "ab", "clip_range must be a list or tuple of two numbers"),
    ("clip_range", [0, float("inf")], r"clip_range\[1\] must be a finite number"),
    ("num_sampling_steps", 2.5, "num_sampling_steps must be a string .* or an integer, got 2.5"),
    ("tokenizer", 3, "tokenizer must be a string, got 3"),
])
def test_bad_field_values_are_named(name, value, message):
    with pytest.raises(ConfigError, match=message):
        MARConfig.from_dict({**PRESETS["mar_base"], name: value})
    with pytest.raises(ConfigError, match=message):
        MARConfig(**{name: value})


def test_coerce_fields_is_general():
    @dataclasses.dataclass
    class Other:
        steps: int = 1
        scale: float = 1.0
        flag: bool = False
        name: str = "x"
        limit: int | None = None

    got = coerce_fields(Other, {"steps": "3", "scale": 2, "flag": "No", "name": "y", "limit": None})
    assert got == {"steps": 3, "scale": 2.0, "flag": False, "name": "y", "limit": None}
    assert type(got["scale"]) is float
    assert coerce_fields(Other, argparse.Namespace(limit="7")) == {"limit": 7}
    with pytest.raises(ConfigError, match="unknown config fields: \\['colour'\\]"):
        coerce_fields(Other, {"colour": "red"})
    with pytest.raises(ConfigError, match="steps must be an integer, got None"):
        coerce_fields(Other, {"steps": None})
    with pytest.raises(ConfigError, match="must be a dict or argparse.Namespace, got list"):
        coerce_fields(Other, [("steps", 1)])


# 4. Size limits, checked before anything is allocated -------------------------------------------

@pytest.mark.parametrize("name, value, limit", [
    ("encoder_depth", 10**9, f"MAX_DEPTH = {MAX_DEPTH}"),
    ("decoder_depth", 10**6, f"MAX_DEPTH = {MAX_DEPTH}"),
    ("diffloss_d", 10**9, f"MAX_DEPTH = {MAX_DEPTH}"),
    ("diffloss_w", 10**12, f"MAX_WIDTH = {MAX_WIDTH}"),
    ("class_num", 10**12, "MAX_CLASSES = 1000000"),
    ("buffer_size", 10**9, "MAX_BUFFER_SIZE = 16384"),
    ("mlp_ratio", 1e6, "MAX_MLP_RATIO = 64.0"),
])
def test_huge_sizes_refused_fast(name, value, limit):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=re.escape(f"{name} = {value} exceeds the engine's limit {limit}")):
        engine.load(CHECKPOINT, **{name: value})
    assert time.perf_counter() - start < 2.0


def test_huge_widths_heads_and_images_refused():
    for values, message in (
            (dict(encoder_embed_dim=2**20, encoder_num_heads=16), "encoder_embed_dim = 1048576 .*MAX_WIDTH"),
            (dict(encoder_num_heads=4096, encoder_embed_dim=8192), "encoder_num_heads = 4096 .*MAX_HEADS"),
            (dict(img_size=2**20), "img_size = 1048576 .*MAX_IMG_SIZE"),
            (dict(img_size=8192, vae_stride=8), r"seq_len .* = 1048576 .*MAX_SEQ_LEN"),
            (dict(vae_embed_dim=64, patch_size=64, img_size=1024), r"token_dim .* = 262144 .*MAX_TOKEN_DIM"),
            (dict(mlp_ratio=0.0001), "MLP of width"),
            (dict(encoder_embed_dim=8, encoder_num_heads=16), "encoder_num_heads = 16 exceeds encoder_embed_dim = 8")):
        start = time.perf_counter()
        with pytest.raises(ConfigError, match=message):
            MARConfig(**values)
        assert time.perf_counter() - start < 0.1


def test_parameter_count_limit():
    # Each size is within its own limit; together they imply ~1.1e12 parameters.
    values = dict(encoder_embed_dim=16384, decoder_embed_dim=16384, encoder_depth=256,
                  decoder_depth=256, encoder_num_heads=128, decoder_num_heads=128)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=f"parameter count .* exceeds the engine's limit MAX_PARAMS = {MAX_PARAMS:,}"):
        MARConfig(**values)
    with pytest.raises(ConfigError, match="MAX_PARAMS"):
        engine.load(CHECKPOINT, **values)
    assert time.perf_counter() - start < 2.0


def test_hostile_block_index_in_the_weights(tmp_path, ckpt):
    # Depths are inferred from the largest block index: 10**9 must not build 10**9 blocks.
    obj = with_args(ckpt)
    del obj["args"].encoder_depth
    obj["model_ema"]["encoder_blocks.999999999.norm1.weight"] = torch.ones(64)
    path = save(tmp_path, obj)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="encoder_depth = 1000000000 exceeds .*MAX_DEPTH"):
        engine.load(path)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("values", [
    dict(),
    dict(img_size=64, patch_size=2, mlp_ratio=3.0, buffer_size=0, class_num=7),
    dict(encoder_depth=0, decoder_depth=1, diffloss_d=0, decoder_embed_dim=96, decoder_num_heads=3),
    dict(tokenizer="pixels", img_size=16, vae_stride=1, patch_size=4, vae_embed_dim=1, mlp_ratio=2.5),
])
def test_estimate_params_is_exact(values):
    config = MARConfig.from_dict({**PRESETS["mar_base"], "encoder_depth": 2, "decoder_depth": 2,
                                  **values})
    with torch.device("meta"):
        count = sum(p.numel() for p in MAR(config).state_dict().values())
    assert estimate_params(config) == count


def test_published_sizes_are_within_limits_and_checked_in_milliseconds():
    start = time.perf_counter()
    configs = [MARConfig.from_preset(name) for name in PRESETS for _ in range(20)]
    assert time.perf_counter() - start < 0.5
    assert 0.9e9 < estimate_params(configs[-1]) < 1.0e9  # MAR-H


# 5. Honest CI -----------------------------------------------------------------------------------

def test_ci_requires_the_native_extension():
    text = (ROOT / ".ci" / "run").read_text()
    assert "export ENGINE_REQUIRE_NATIVE=1" in text
    assert text.index("ENGINE_REQUIRE_NATIVE") < text.index("pytest")


def test_triton_interpreter_only_without_cuda(device):
    assert device == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") is not None  # conftest chose (or the user set) it


def test_rel_err_helper_and_fixture(rel_err):
    assert rel_err is conftest_rel_err
    a = torch.tensor([1.0, 2.0, 2.0])
    assert rel_err(a, a) == 0.0
    assert rel_err(a + torch.tensor([0.0, 0.0, 0.3]), a) == pytest.approx(0.1)
    assert isinstance(rel_err(a.half(), a), float)


# Sampling: sizes and values refused at the API boundary, fast; non-finite results never returned.
def timed_refusal(call, error, message, limit_s=2.0):
    start = time.monotonic()
    with pytest.raises(error, match=message):
        call()
    assert time.monotonic() - start < limit_s


@pytest.fixture(scope="module")
def golden_model():
    return engine.load(CHECKPOINT, backend="reference")


@pytest.mark.parametrize("kwargs,message", [
    (dict(bsz=10 ** 9), "bsz=1000000000 exceeds the limit"),
    (dict(num_iter=10 ** 9), "num_iter=1000000000 exceeds the limit"),
    (dict(cfg=1e39), "cfg must be a finite number"),
    (dict(cfg=float("nan")), "cfg must be a finite number"),
    (dict(temperature=1e300), "temperature must be a finite number"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(bsz=2.0), "bsz must be an integer"),
    (dict(num_iter=True), "num_iter must be an integer"),
])
def test_sampling_arguments_refused_fast(golden_model, kwargs, message):
    args = {"num_iter": 2, **{k: v for k, v in kwargs.items() if k != "bsz"}}
    bsz = kwargs.get("bsz", 1)
    for generator in (None, torch.Generator().manual_seed(0)):
        timed_refusal(lambda: golden_model.sample_tokens(bsz, generator=generator, **args),
                      engine.SamplingError, message)


def test_overflowing_guidance_is_an_error_not_nan(golden_model):
    """cfg = 3e38 is a finite float32, but the guided eps overflows: an error, not NaN tokens."""
    with pytest.raises(engine.SamplingError, match=r"NaN/Inf tokens in image\(s\) \[0\]"):
        golden_model.sample_tokens(1, num_iter=2, cfg=3e38, cfg_schedule="constant", labels=[0],
                                   generator=torch.Generator().manual_seed(0))
    # Linear: the schedule's own arithmetic overflows first; refused before sampling.
    with pytest.raises(engine.SamplingError, match=r"cfg=3e\+38 with its schedule overflows float32 at step 0"):
        golden_model.sample_tokens(1, num_iter=2, cfg=3e38, labels=[0])


def test_cli_refuses_nonfinite_weights_with_one_line(tmp_path, ckpt):
    import subprocess
    import sys

    state = {k: v.clone() for k, v in ckpt["model_ema"].items()}
    state["z_proj.weight"][0, 0] = float("nan")
    torch.save({**ckpt, "model_ema": state}, tmp_path / "nan.pth")
    proc = subprocess.run([sys.executable, "-m", "engine", "sample", "--checkpoint", str(tmp_path / "nan.pth"),
                           "--out", str(tmp_path / "x.npz")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'z_proj.weight' holds 1 non-finite values" in proc.stderr
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_a_model_is_safe_to_share_across_threads(backend):
    """Concurrent sample_tokens calls on one model, each with its own generators, give exactly
    what each gives alone (the model holds no per-call state; see README "Threads")."""
    from concurrent.futures import ThreadPoolExecutor

    if backend == "native" and "native" not in engine.backends.available_backends("cpu"):
        pytest.fail("the native backend did not build")   # CI requires it (ENGINE_REQUIRE_NATIVE)
    model = engine.load("digits", backend=backend)

    def job(seed):
        return model.sample_tokens(2, num_iter=3, cfg=2.0, labels=[seed % 10, (seed + 3) % 10],
                                   generator=[torch.Generator().manual_seed(seed + i) for i in range(2)])

    seeds = list(range(8))
    alone = [job(s) for s in seeds]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(job, seeds))
    for a, b in zip(alone, together):
        assert torch.equal(a, b)
