"""Checkpoints of any dtype, and `engine convert`'s all-or-nothing engine directories."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine
from engine import CheckpointError
from engine.core.errors import OutputError
from engine.families import checkpoints
from engine.loading import BUILTIN_MODELS
from helpers import CHECKPOINT

REFUSED = [torch.int8, torch.int32, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn]


def _with_dtype(tmp_path, name, dtype):
    """A copy of built-in model `name` whose floating weights are stored as `dtype`."""
    out = tmp_path / f"{name}-{str(dtype).removeprefix('torch.')}"
    shutil.copytree(BUILTIN_MODELS[name], out)
    weights = out / "model.safetensors"
    state = load_file(str(weights))
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, str(weights))
    return out


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_integer_boolean_complex_weights_are_refused_naming_the_tensor(tmp_path, name):
    for dtype in REFUSED:
        path = _with_dtype(tmp_path, name, dtype)
        short = str(dtype).removeprefix("torch.")
        with pytest.raises(CheckpointError, match=rf"tensor '[\w.]+' has dtype {short}; weights must be float16"):
            engine.load(path)


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_float64_weights_give_the_float32_tokens_and_bfloat16_weights_sample(tmp_path, name):
    # The built-in weights are stored in float16, so float64 holds them exactly.
    reference = engine.load(name)
    wide = engine.load(_with_dtype(tmp_path, name, torch.float64))
    narrow = engine.load(_with_dtype(tmp_path, name, torch.bfloat16))
    for model in (wide, narrow):
        assert all(v.dtype != torch.float64 for v in model.state_dict().values())   # cast on load
    for key, value in reference.state_dict().items():
        assert torch.equal(wide.state_dict()[key], value), key
    kwargs = {"prompts": ["a 3"]} if reference.conditioning == "text" else {"labels": [3]}

    def images_of(model):
        return engine.generate(model, generator=torch.Generator().manual_seed(5), output_type="pt", **kwargs)

    want = images_of(reference)
    assert torch.equal(images_of(wide), want)
    images = images_of(narrow)
    assert images.shape == want.shape and bool(torch.isfinite(images).all())


def test_cluster_map_must_stay_integer(tmp_path):
    path = _with_dtype(tmp_path, "digits-ctf", torch.float32)
    state = load_file(str(path / "model.safetensors"))
    state["cluster_of"] = state["cluster_of"].float()
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="cluster_of' has dtype float32; it must be an integer tensor"):
        engine.load(path)


def test_cli_prints_one_error_line_and_exits_2_for_integer_weights(tmp_path):
    path = _with_dtype(tmp_path, "digits-elm-ar", torch.int8)
    proc = subprocess.run([sys.executable, "-m", "engine", "sample", "--checkpoint", str(path),
                           "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert "has dtype int8" in proc.stderr and "Traceback" not in proc.stderr


def test_bae_and_vae_files_with_integer_tensors_are_refused(tmp_path):
    bae = load_file(str(BUILTIN_MODELS["digits-elm-ar"] / "bae" / "bae.safetensors"))
    key = next(k for k, v in bae.items() if k.startswith("generator.") and v.is_floating_point())
    bae[key] = bae[key].to(torch.int16)
    save_file(bae, str(tmp_path / "bae.safetensors"))
    with pytest.raises(CheckpointError, match=f"tensor '{key}' has dtype int16"):
        engine.load_bae(tmp_path / "bae.safetensors")

    from engine.decoders.vae import KLDecoder
    state = {k: torch.zeros(v.shape, dtype=torch.int8 if k == "post_quant_conv.weight" else torch.float32)
             for k, v in KLDecoder().state_dict().items()}
    torch.save(state, tmp_path / "kl16.ckpt")
    with pytest.raises(CheckpointError, match="tensor 'post_quant_conv.weight' has dtype int8"):
        engine.load_vae(tmp_path / "kl16.ckpt")


def test_a_generator_checkpoint_given_as_the_bae_is_named_as_such():
    published = Path(__file__).parents[1] / "data" / "published" / "ck_p2.pth"
    with pytest.raises(CheckpointError, match="a generator's training checkpoint .* not a binary autoencoder"):
        engine.load_bae(published)


@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr", "meta", "qint8"])
def test_sparse_meta_and_quantised_tensors_in_a_pth_are_refused_by_name(tmp_path, layout):
    # .pth files can hold what safetensors cannot: each is refused by name, not by a torch error.
    data = Path(__file__).parents[1] / "data"
    make = {"sparse_coo": lambda t: t.to_sparse(), "sparse_csr": lambda t: t.to_sparse_csr(),
            "meta": lambda t: t.to("meta"),
            "qint8": lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)}[layout]
    published = torch.load(data / "published" / "ck_p2.pth", weights_only=False)
    published["model_ema"]["fake_latent"] = make(published["model_ema"]["fake_latent"].float())
    torch.save(published, tmp_path / "mar.pth")
    bae = torch.load(data / "elm" / "binaryae_ema.th", weights_only=True)
    key = next(k for k, v in bae.items() if v.ndim == 2 and v.is_floating_point())
    bae[key] = make(bae[key].float())
    torch.save(bae, tmp_path / "bae.th")
    message = "has dtype qint8" if layout == "qint8" else f"is a {layout}" if layout != "meta" else "is a meta tensor"
    with pytest.raises(CheckpointError, match=f"tensor 'fake_latent' {message}"):
        engine.load(tmp_path / "mar.pth")
    with pytest.raises(CheckpointError, match=f"tensor '{key.removeprefix('ae.')}' {message}"):
        engine.load_bae(tmp_path / "bae.th")


def test_check_dtypes_is_the_rule_stated():
    good = {"a": torch.zeros(2, dtype=d) for d in checkpoints.check_dtypes.__globals__["WEIGHT_DTYPES"]}
    for key, value in good.items():
        checkpoints.check_dtypes({key: value}, "s")
    checkpoints.check_dtypes({"map": torch.zeros(2, dtype=torch.int64)}, "s", {"map": torch.int64})
    with pytest.raises(CheckpointError, match="'map' has dtype bool; it must be an integer tensor"):
        checkpoints.check_dtypes({"map": torch.zeros(2, dtype=torch.bool)}, "s", {"map": torch.int64})


# --- convert ---------------------------------------------------------------------------------

def test_convert_refuses_a_non_empty_directory_unless_forced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{\"mine\": 1}")
    with pytest.raises(OutputError, match="is not empty; pass --force"):
        engine.convert(CHECKPOINT, out)
    assert json.loads((out / "config.json").read_text()) == {"mine": 1}
    engine.convert(CHECKPOINT, out, force=True)
    assert json.loads((out / "config.json").read_text())["format"] == "engine-mar"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]   # nothing left beside it
    (tmp_path / "empty").mkdir()
    engine.convert(CHECKPOINT, tmp_path / "empty")                 # an empty directory is fine
    engine.load(tmp_path / "empty")


def test_force_replaces_only_a_model_directory(tmp_path, monkeypatch):
    # A typo'd `.`, a home directory or the folder that holds the source is never replaced.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    model = engine.convert(CHECKPOINT, tmp_path / "model")
    for out in (".", tmp_path, str(tmp_path) + "/"):
        with pytest.raises(OutputError, match=r"holds files that are not an engine model directory's "
                                              r"\('model', 'notes.txt'\)"):
            engine.convert(model, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "notes.txt"]
    nested = engine.convert(model, model / "copy")                  # the source holding its copy
    with pytest.raises(OutputError, match=r"\('copy'\)"):
        engine.convert(nested, model, force=True)
    assert (model / "copy" / "model.safetensors").exists()
    engine.convert(nested, nested, force=True)                       # in place: a model directory
    engine.load(nested)


def test_convert_never_creates_parent_directories(tmp_path):
    with pytest.raises(OutputError, match="parent directory .*missing.* does not exist"):
        engine.convert(CHECKPOINT, tmp_path / "missing" / "out")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        engine.convert(CHECKPOINT, tmp_path / "file", force=True)


@pytest.mark.parametrize("force", [False, True])
def test_a_convert_that_dies_mid_write_leaves_nothing_or_the_old_directory(tmp_path, monkeypatch, force):
    out = tmp_path / "out"
    if force:
        engine.convert(CHECKPOINT, out)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = checkpoints.save_engine_dir

    def dies_after_the_weights(state, config, out_dir, family, extra=None):
        real(state, config, out_dir, family, extra)
        (out_dir / "config.json").unlink()
        raise KeyboardInterrupt   # killed between the weights and the config

    monkeypatch.setattr(checkpoints, "save_engine_dir", dies_after_the_weights)
    with pytest.raises(KeyboardInterrupt):
        engine.convert(CHECKPOINT, out, force=force)
    if force:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if force else [])


def test_a_convert_killed_while_writing_leaves_no_directory(tmp_path):
    # SIGKILL a real convert as soon as its temporary directory appears: OUT must not exist.
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "engine", "convert", str(CHECKPOINT), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir()):
                proc.kill()
                break
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait()
    if proc.returncode == 0:   # it finished before we saw it: then OUT is complete
        engine.load(out)
    else:
        assert not out.exists() or engine.load(out) is not None


def test_convert_cli_force_family_and_config(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("an old, broken model")
    cmd = [sys.executable, "-m", "engine", "convert", str(CHECKPOINT), str(out), "--family", "mar"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "--force" in proc.stderr
    proc = subprocess.run(cmd + ["--force"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    proc = subprocess.run([sys.executable, "-m", "engine", "convert", str(CHECKPOINT),
                           str(tmp_path / "no" / "out")], capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and not (tmp_path / "no").exists()


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_a_converted_engine_directory_samples_as_the_original(tmp_path, name):
    # Its companions (BAE, text encoder) and sampling defaults come along: the copy is complete.
    out = engine.convert(name, tmp_path / "copy")
    source = BUILTIN_MODELS[name]
    for companion in ("bae", "text_encoder"):
        assert (out / companion).is_dir() == (source / companion).is_dir()
    meta, original = (json.loads((d / "config.json").read_text()) for d in (out, source))
    assert meta.get("sampling") == original.get("sampling")
    kwargs = {"prompts": ["a 3"]} if engine.load(name).conditioning == "text" else {"labels": [3, 7]}
    images = [engine.generate(engine.load(str(d)), generator=torch.Generator().manual_seed(2),
                              output_type="pt", **kwargs) for d in (out, source)]
    assert torch.equal(*images)


def test_a_bare_state_dict_with_a_non_tensor_entry_names_it(tmp_path):
    # ELM publishes bare state dicts; one damaged entry is named, not "not a model checkpoint".
    state = torch.load(Path(__file__).parents[1] / "data" / "elm" / "ck_a.pth", weights_only=True)
    state["layers.0.attention.wo.weight"] = [1, 2, 3]
    torch.save(state, tmp_path / "ck.pth")
    with pytest.raises(CheckpointError, match=r"entries that are not tensors: \['layers.0.attention.wo.weight'\]"):
        engine.load(tmp_path / "ck.pth", n_head=4)
