"""Fluid: every output recorded from LightGen's own FLUID code (tests/data/lightgen, see
make_lightgen_outputs.py there), reproduced through engine.load, engine.accelerate and
engine.patch with every CPU backend, plus the intermediate passes it recorded."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import engine
from engine import SamplingError
from engine.backends import available_backends
from engine.models.fluid import interpolate_positions
from helpers import rel_err

DATA = Path(__file__).resolve().parents[2] / "data" / "lightgen"
RECORD = json.loads((DATA / "runs.json").read_text())
TOKENS = load_file(str(DATA / "tokens.safetensors"))
TEXTS = load_file(str(DATA / "texts.safetensors"))
CPU_BACKENDS = [b for b in available_backends("cpu") if b in ("native", "reference")]


def run_id(run):
    return f"{run['config']}.{run['index']}-cfg{run['cfg']}-{run['height']}x{run['width']}"


def sample(model, run):
    texts = None if run["texts"] is None else TEXTS[run["texts"]]
    torch.manual_seed(run["seed"])
    np.random.seed(run["seed"])
    return model.sample_tokens(run["bsz"], num_iter=run["num_iter"], cfg=run["cfg"],
                               cfg_schedule=run["cfg_schedule"], texts=texts,
                               temperature=run["temperature"], height=run["height"], width=run["width"])


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(config, weights, backend):
        key = (config, weights, backend)
        if key not in cache:
            cache[key] = engine.load(DATA / f"ck_{config}.pth", ema=weights == "model_ema", backend=backend)
        return cache[key]
    return get


def test_recorded_cases_cover_the_issue():
    runs = RECORD["runs"]
    assert {r["cfg"] == 1.0 for r in runs} == {True, False}
    assert {r["cfg_schedule"] for r in runs} == {"linear", "constant"}
    assert {r["texts"] is None for r in runs} == {True, False}
    assert {r["weights"] for r in runs} == {"model", "model_ema"}
    assert any(r["temperature"] != 1.0 for r in runs)
    sizes = {(r["height"], r["width"]) for r in runs}
    assert (256, 256) in sizes and (128, 128) in sizes and any(h != w for h, w in sizes)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("run", RECORD["runs"], ids=run_id)
def test_sample_tokens_reproduces_lightgen(models, backend, run):
    model = models(run["config"], run["weights"], backend)
    assert model.family == "fluid"
    got = sample(model, run)
    want = TOKENS[f"{run['config']}.{run['index']}"]
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-4


def fluid_standin(model):
    """An object with the attributes, modules and state dict of a LightGen FLUID instance (what
    engine.accelerate duck-types), built around an engine model's modules."""
    fluid, c = model.mar, model.config
    obj = torch.nn.Module()
    for name, child in fluid.named_children():
        obj.add_module(name, child)
    for name, p in fluid.named_parameters(recurse=False):
        obj.register_parameter(name, p)
    for key in ("img_size", "vae_stride", "patch_size", "vae_embed_dim", "max_length", "interpolate_offset"):
        setattr(obj, key, getattr(c, key))
    from engine.ops.diffusion import NUM_TRAIN_TIMESTEPS, space_timesteps
    obj.diffloss.gen_diffusion = type("D", (), {"use_timesteps": set(
        space_timesteps(NUM_TRAIN_TIMESTEPS, c.num_sampling_steps))})()
    return obj


@pytest.mark.parametrize("config", sorted(RECORD["configs"]))
def test_accelerate_and_patch_take_a_fluid_instance(models, config):
    run = next(r for r in RECORD["runs"] if r["config"] == config and r["weights"] == "model_ema")
    loaded = models(config, "model_ema", "reference")
    standin = fluid_standin(loaded)
    accelerated = engine.accelerate(standin, backend=CPU_BACKENDS[0])
    assert accelerated.config.to_dict() == loaded.config.to_dict()
    want = TOKENS[f"{config}.{run['index']}"]
    assert rel_err(sample(accelerated, run), want) <= 1e-4
    patched = engine.patch(fluid_standin(loaded), backend=CPU_BACKENDS[0])
    assert rel_err(sample(patched, run), want) <= 1e-4
    torch.manual_seed(run["seed"])
    np.random.seed(run["seed"])
    default_size = patched.sample_tokens(1, num_iter=2)   # LightGen's signature: 512 x 512
    stride = loaded.config.vae_stride
    assert default_size.shape[-2:] == (512 // stride, 512 // stride)


def test_intermediate_passes(models):
    inter = load_file(str(DATA / "intermediate.safetensors"))
    model = models(RECORD["intermediate"]["config"], RECORD["intermediate"]["weights"], "reference")
    fluid = model.mar
    with torch.no_grad():
        text = fluid.text_emb(inter["texts"])
        assert rel_err(text, inter["text_emb"]) <= 1e-5
        for name in ("base", "ns", "full"):
            mask, tokens = inter[f"{name}.mask"], inter[f"{name}.tokens"]
            length = mask.shape[1]
            grid = {256: (16, 16), 96: (8, 12)}[length]
            enc_pos, dec_pos, last_pos = fluid.positions(grid)
            order = torch.argsort(mask, dim=1, stable=True)
            known = order[:, :int((mask[0] == 0).sum())]
            everything = torch.arange(length).expand(mask.shape[0], -1)
            encoded = fluid.encode(tokens, known, enc_pos)
            assert encoded.shape == inter[f"{name}.encoder"].shape
            if encoded.numel():
                assert rel_err(encoded, inter[f"{name}.encoder"]) <= 1e-5
            decoded = fluid.decode(encoded, known, everything, dec_pos)
            assert rel_err(decoded, inter[f"{name}.decoder"]) <= 1e-5
            kv = [t for block in fluid.cross_attn_blocks for t in block.keys_values(text)]
            z = fluid.text_decode(decoded, everything, last_pos, kv)
            assert rel_err(z, inter[f"{name}.z"]) <= 1e-5
        for key in [k for k in inter if k.startswith("pos.encoder.")]:
            h, w = map(int, key.rsplit(".", 1)[1].split("x"))
            got = interpolate_positions(fluid.encoder_pos_embed_learned, (h, w), 0.1)
            assert rel_err(got, inter[key]) <= 1e-6, key


def test_positions_are_computed_once_per_resolution(models):
    fluid = models("p1", "model_ema", "reference").mar
    first = fluid.positions((8, 12))
    assert fluid.positions((8, 12))[0] is first[0]
    stored = fluid.positions((16, 16))[0]      # the stored grid as is, no copy
    assert stored.data_ptr() == fluid.encoder_pos_embed_learned.data_ptr()


def test_fluid_bad_inputs_have_clear_messages(models):
    model = models("p1", "model_ema", "reference")
    c = model.config
    good = torch.zeros(1, c.max_length, c.caption_channels)
    cases = [
        (dict(texts=torch.zeros(1, c.max_length + 1, c.caption_channels)), "texts must have shape"),
        (dict(texts=good.long()), "texts must be floating point"),
        (dict(texts=good * float("nan")), "texts contain NaN"),
        (dict(texts="a cat"), "texts must be a tensor"),
        (dict(height=100), "height must be a positive multiple of vae_stride"),
        (dict(width=0), "width must be a positive multiple"),
        (dict(height=16 * 1024, width=16 * 1024), "the limit is"),
    ]
    for kwargs, message in cases:
        with pytest.raises(SamplingError, match=message):
            model.sample_tokens(1, num_iter=2, **{"texts": good, **kwargs})
    with pytest.raises(SamplingError, match="Fluid is text-conditioned"):
        from engine.core.conditioning import Condition
        model.sample(1, Condition("class", torch.tensor([0])), (16, 16))
    uneq = models("uneq", "model_ema", "reference")
    texts = torch.zeros(1, uneq.config.max_length, uneq.config.caption_channels)
    with pytest.raises(SamplingError, match="cannot condition on text"):
        uneq.sample_tokens(1, num_iter=2, texts=texts)


def test_fluid_configuration_errors(tmp_path):
    ckpt = torch.load(DATA / "ck_p1.pth", weights_only=False)
    with pytest.raises(engine.ConfigError, match="decoder_embed_dim == cross_embed_dim"):
        engine.load(DATA / "ck_p1.pth", decoder_embed_dim=48)
    args = vars(ckpt["args"])
    del args["cross_num_heads"]
    torch.save({"model": ckpt["model"], "args": args}, tmp_path / "noheads.pth")   # as LightGen reads
    with pytest.raises(engine.ConfigError, match="cross_num_heads"):
        engine.load(tmp_path / "noheads.pth")
    loaded = engine.load(tmp_path / "noheads.pth", cross_num_heads=2, mask_ratio_min=0.5)  # training-only: ignored
    assert loaded.family == "fluid" and loaded.config.cross_num_heads == 2


def test_triton_kernels_run_the_fluid_head_unchanged(models):
    """The Triton head (here in Triton's interpreter; real kernels where CUDA exists) on a
    recorded LightGen case: the kernels know nothing of the family."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if "triton" not in available_backends(device, include_interpreted=True):
        pytest.fail("the Triton backend is unavailable (TRITON_INTERPRET=1 is set by conftest on CPU)")
    run = next(r for r in RECORD["runs"] if r["config"] == "p1" and r["index"] == 1)  # cfg 3, texts
    model = engine.load(DATA / "ck_p1.pth", ema=True, backend="triton", device=device)
    got = sample(model, run)
    assert rel_err(got.cpu(), TOKENS["p1.1"]) <= 1e-4


def test_fluid_loads_the_weights_lightgen_samples_with():
    """LightGen's sampling scripts read checkpoint['model']: so does engine.load by default."""
    default = engine.load(DATA / "ck_p1.pth", backend="reference")
    raw = engine.load(DATA / "ck_p1.pth", ema=False, backend="reference")
    ema = engine.load(DATA / "ck_p1.pth", ema=True, backend="reference")
    key = "z_proj.weight"
    assert torch.equal(default.state_dict()[key], raw.state_dict()[key])
    assert not torch.equal(default.state_dict()[key], ema.state_dict()[key])
