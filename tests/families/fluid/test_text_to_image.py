"""Text-to-image around Fluid: engine.load_text_encoder (a local T5 as LightGen's T5_Embedding),
engine.load_vae on a diffusers AutoencoderKL directory (the SD-3.5-style decode) and
engine.generate(prompts=...) end to end, all on tiny random assets built in a tmp dir
(tests/fluid_assets.py; nothing is downloaded)."""
import shutil

import numpy as np
import pytest
import torch

import engine
from engine import CheckpointError, ConfigError, SamplingError
from engine.families.fluid import FluidModel
from engine.images import to_uint8
from engine.families.mar import MARModel
import fluid_assets as fa
from helpers import random_fluid, random_mar

MAX_LENGTH = 6
PROMPTS = ["a cat", "two dogs"]
# Fluid tokens at the tiny VAE's stride (2): an 8 x 8 image is a 4 x 4 token grid, decoded back
# to 8 x 8 pixels.
IMG = 8
SETTINGS = dict(num_iter=3, cfg=2.0)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fluid_assets")
    return {"t5": fa.make_t5_dir(root), "sd": fa.make_vae_dir(root)}


@pytest.fixture(scope="module")
def enc(assets):
    return engine.load_text_encoder(assets["t5"], max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def direct_t5(assets):
    from transformers import AutoTokenizer, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(str(assets["t5"]), local_files_only=True)
    model = T5EncoderModel.from_pretrained(str(assets["t5"]), local_files_only=True).eval()

    def encode(prompts, max_length=MAX_LENGTH):
        batch = tok(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt")
        with torch.no_grad():
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    return encode


@pytest.fixture(scope="module")
def vae(assets):
    return engine.load_vae(assets["sd"])


@pytest.fixture(scope="module")
def model():
    module = random_fluid(0, caption_channels=fa.T5_D_MODEL, max_length=MAX_LENGTH,
                          vae_embed_dim=fa.VAE_LATENT_CHANNELS, img_size=IMG, vae_stride=fa.VAE_SCALE,
                          num_sampling_steps="5")
    return FluidModel(module, backend="reference")


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def copy_without(src, dst, *names):
    shutil.copytree(src, dst)
    for name in names:
        (dst / name).unlink()
    return dst


# Text encoder ---------------------------------------------------------------------------------

def test_text_encoder_matches_transformers(enc, direct_t5):
    out = enc(PROMPTS)
    assert out.shape == (2, MAX_LENGTH, fa.T5_D_MODEL) and out.dtype == torch.float32
    assert torch.equal(out, direct_t5(PROMPTS))
    assert enc.channels == fa.T5_D_MODEL and enc.max_length == MAX_LENGTH
    # one string: a batch of one (to rounding: some CPUs' GEMMs block a batch of 1 differently)
    torch.testing.assert_close(enc("a cat"), out[:1], rtol=1e-5, atol=1e-6)


def test_text_encoder_pads_with_mask(enc, direct_t5):
    batch = enc.tokenize(["a cat", "two dogs on the red mat"])
    ids, mask = batch.input_ids, batch.attention_mask
    v = fa.VOCAB
    assert ids[0].tolist() == [v["a"], v["cat"], v["</s>"], 0, 0, 0]   # T5-style: eos, then pads
    assert mask[0].tolist() == [1, 1, 1, 0, 0, 0]
    assert mask[1].tolist() == [1] * MAX_LENGTH
    # Padding is masked out: the real positions do not depend on how far prompts are padded.
    longer = direct_t5(["a cat"], max_length=MAX_LENGTH + 4)
    torch.testing.assert_close(enc(["a cat"])[:, :3], longer[:, :3], rtol=1e-5, atol=1e-6)
    # ... and the mask is really applied (without it the pads would be attended to).
    unmasked = enc.encoder(input_ids=ids[:1]).last_hidden_state
    assert not torch.allclose(unmasked[:, :3], enc(["a cat"])[:, :3], atol=1e-4)


def test_text_encoder_truncates_long_prompts(enc):
    long = "a cat on the red mat sitting on the big blue house"
    batch = enc.tokenize([long])
    assert batch.input_ids.shape == (1, MAX_LENGTH)
    assert batch.input_ids[0, -1].item() == fa.VOCAB["</s>"]
    # Truncated to its first max_length - 1 words (+ eos), as the tokenizer does for T5.
    assert torch.equal(enc([long]), enc(["a cat on the red"]))
    assert enc([long, "a"]).shape == (2, MAX_LENGTH, fa.T5_D_MODEL)


def test_text_encoder_unknown_words_and_empty_prompt(enc):
    """A closed (word-level) vocabulary refuses words it would encode as <unk>, naming them
    and the vocabulary; an empty prompt is just padding."""
    out = enc(["a cat", ""])
    assert out.shape == (2, MAX_LENGTH, fa.T5_D_MODEL) and bool(torch.isfinite(out).all())
    assert enc.vocabulary == fa.WORDS
    with pytest.raises(SamplingError, match=r"unknown words 'zebra', 'x' in prompt 'a zebra x'; "
                                            r"the vocabulary is: a cat two"):
        enc(["a zebra x"])


@pytest.mark.parametrize("bad", [[1, 2], [], None, ["a", None], 3, [b"a cat"]])
def test_text_encoder_rejects_non_string_prompts(enc, bad):
    with pytest.raises(SamplingError, match="prompts must be"):
        enc(bad)


@pytest.mark.parametrize("max_length", [0, -1, True, "6", 2.0])
def test_text_encoder_bad_max_length(assets, max_length):
    with pytest.raises(SamplingError, match="max_length"):
        engine.load_text_encoder(assets["t5"], max_length=max_length)


def test_text_encoder_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="text encoder directory not found"):
        engine.load_text_encoder(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="text encoder directory not found"):
        engine.load_text_encoder(tmp_path / "file.txt")


@pytest.mark.parametrize("removed, named", [
    (("config.json",), ["config.json"]),
    (("model.safetensors",), ["model.safetensors", "pytorch_model.bin"]),
    (("tokenizer.json",), ["tokenizer.json", "spiece.model"]),
    (("config.json", "model.safetensors", "tokenizer.json"), ["config.json", "model.safetensors",
                                                              "tokenizer.json"]),
])
def test_text_encoder_incomplete_directory(assets, tmp_path, removed, named):
    broken = copy_without(assets["t5"], tmp_path / "t5", *removed)
    with pytest.raises(CheckpointError, match="not a complete T5 encoder directory") as err:
        engine.load_text_encoder(broken)
    for name in named:
        assert name in str(err.value)


def test_text_encoder_corrupt_files(assets, tmp_path):
    broken = shutil.copytree(assets["t5"], tmp_path / "t5")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot load"):
        engine.load_text_encoder(broken)
    broken = shutil.copytree(assets["t5"], tmp_path / "t5b")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot load"):
        engine.load_text_encoder(broken)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_text_encoder_cuda_without_cuda(assets):
    with pytest.raises(ConfigError, match="no CUDA"):
        engine.load_text_encoder(assets["t5"], device="cuda")


# SD VAE ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["pipeline", "vae"])
def test_sd_vae_decodes_like_diffusers(assets, where):
    from diffusers import AutoencoderKL

    path = assets["sd"] if where == "pipeline" else assets["sd"] / "vae"
    dec = engine.load_vae(path)
    assert (dec.scaling_factor, dec.shift_factor, dec.latent_channels) == (
        fa.SCALING_FACTOR, fa.SHIFT_FACTOR, fa.VAE_LATENT_CHANNELS)
    direct = AutoencoderKL.from_pretrained(str(assets["sd"] / "vae"), local_files_only=True).eval()
    t = torch.randn(2, fa.VAE_LATENT_CHANNELS, 3, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = direct.decode(t / fa.SCALING_FACTOR + fa.SHIFT_FACTOR).sample
    got = dec.decode_tokens(t)
    assert got.shape == (2, 3, 3 * fa.VAE_SCALE, 4 * fa.VAE_SCALE)
    assert torch.equal(got, want)


def test_sd_vae_bf16(assets, vae):
    t = torch.randn(1, fa.VAE_LATENT_CHANNELS, 2, 2, generator=torch.Generator().manual_seed(1))
    low = engine.load_vae(str(assets["sd"]), dtype=torch.bfloat16)
    assert next(low.parameters()).dtype == torch.bfloat16
    got = low.decode_tokens(t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, vae.decode_tokens(t), rtol=0.1, atol=0.1)


def test_sd_vae_without_shift_factor(assets, tmp_path):
    import json

    path = shutil.copytree(assets["sd"] / "vae", tmp_path / "vae")
    cfg = json.loads((path / "config.json").read_text())
    cfg["shift_factor"] = None
    (path / "config.json").write_text(json.dumps(cfg))
    assert engine.load_vae(path).shift_factor == 0.0


def test_sd_vae_wrong_tokens(vae):
    with pytest.raises(SamplingError, match="16-channel"):
        vae.decode_tokens(torch.zeros(1, 4, 2, 2))
    with pytest.raises(SamplingError, match=r"\[B, 16, h, w\]"):
        vae.decode_tokens(torch.zeros(16, 2, 2))


def test_sd_vae_bad_directories(assets, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        engine.load_vae(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not found"):
        engine.load_vae(tmp_path / "nowhere")
    no_weights = copy_without(assets["sd"], tmp_path / "sd", "vae/diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="no weights"):
        engine.load_vae(no_weights)
    # A directory holding some other model (the T5 encoder) is not taken for a VAE.
    with pytest.raises(CheckpointError, match="AutoencoderKL"):
        engine.load_vae(assets["t5"])
    corrupt = shutil.copytree(assets["sd"], tmp_path / "sd2")
    (corrupt / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot load"):
        engine.load_vae(corrupt)


# End to end -----------------------------------------------------------------------------------

def manual_images(model, enc, vae, prompts, seeds):
    tokens = model.sample_tokens(len(prompts), texts=enc(prompts), generator=gens(*seeds),
                                 cfg_schedule="linear", temperature=1.0, **SETTINGS)
    assert tokens.shape == (len(prompts), fa.VAE_LATENT_CHANNELS, IMG // fa.VAE_SCALE, IMG // fa.VAE_SCALE)
    return ((vae.decode_tokens(tokens) + 1) / 2).clamp(0, 1)


@pytest.fixture(scope="module")
def reference(model, enc, vae):
    return manual_images(model, enc, vae, PROMPTS, (0, 1))


def test_generate_from_prompts(model, enc, vae, reference):
    arr = engine.generate(model, prompts=PROMPTS, text_encoder=enc, vae=vae, output_type="np",
                          generator=gens(0, 1), **SETTINGS)
    assert isinstance(arr, np.ndarray) and arr.shape == (2, IMG, IMG, 3)
    assert arr.min() >= 0 and arr.max() <= 1
    np.testing.assert_array_equal(arr, reference.permute(0, 2, 3, 1).numpy())
    assert not np.array_equal(arr[0], arr[1])


def test_generate_output_types(model, enc, vae, reference):
    pt = engine.generate(model, prompts=PROMPTS, text_encoder=enc, vae=vae, output_type="pt",
                         generator=gens(0, 1), **SETTINGS)
    assert pt.shape == (2, 3, IMG, IMG) and torch.equal(pt, reference)
    pil = engine.generate(model, prompts=PROMPTS, text_encoder=enc, vae=vae, output_type="pil",
                          generator=gens(0, 1), **SETTINGS)
    assert len(pil) == 2 and all(im.size == (IMG, IMG) and im.mode == "RGB" for im in pil)
    for im, want in zip(pil, reference.permute(0, 2, 3, 1).numpy()):
        np.testing.assert_array_equal(np.asarray(im), to_uint8(want))


def test_generate_texts_model_encoder_and_defaults(model, enc, vae, reference):
    got = engine.generate(model, texts=enc(PROMPTS), vae=vae, output_type="pt", generator=gens(0, 1),
                          **SETTINGS)
    assert torch.equal(got, reference)
    model.text_encoder, model.sampling_defaults = enc, dict(SETTINGS)
    try:   # the model's own encoder and recorded defaults
        got = engine.generate(model, prompts=PROMPTS, vae=vae, output_type="pt", generator=gens(0, 1))
    finally:
        model.text_encoder, model.sampling_defaults = None, {}
    assert torch.equal(got, reference)


def test_generate_unconditional(model, vae):
    got = engine.generate(model, num_images=2, vae=vae, output_type="pt", generator=gens(0, 1), **SETTINGS)
    tokens = model.sample_tokens(2, texts=None, generator=gens(0, 1), **SETTINGS)
    assert torch.equal(got, ((vae.decode_tokens(tokens) + 1) / 2).clamp(0, 1))


def test_generate_errors(model, enc, vae, assets):
    kw = dict(vae=vae, output_type="np", **SETTINGS)
    mar = MARModel(random_mar(0, img_size=32), backend="reference")
    with pytest.raises(SamplingError, match="class-conditional"):
        engine.generate(mar, prompts=PROMPTS, text_encoder=enc, **kw)
    with pytest.raises(SamplingError, match="class-conditional"):
        engine.generate(mar, labels=[1], height=64, **kw)
    with pytest.raises(SamplingError, match="text-to-image"):
        engine.generate(model, labels=[1, 2], **kw)
    other = engine.load_text_encoder(assets["t5"], max_length=MAX_LENGTH + 1)
    with pytest.raises(SamplingError, match="max_length"):
        engine.generate(model, prompts=PROMPTS, text_encoder=other, **kw)
    with pytest.raises(SamplingError, match="text encoder"):
        engine.generate(model, prompts=PROMPTS, **kw)
    with pytest.raises(SamplingError, match="num_images=3 but 2 prompts"):
        engine.generate(model, prompts=PROMPTS, text_encoder=enc, num_images=3, **kw)
    with pytest.raises(SamplingError, match="num_images=3 but 2 texts"):
        engine.generate(model, texts=enc(PROMPTS), num_images=3, **kw)
    with pytest.raises(SamplingError, match="not both"):
        engine.generate(model, prompts=PROMPTS, texts=enc(PROMPTS), **kw)
    with pytest.raises(SamplingError, match="texts must be a tensor"):
        engine.generate(model, texts=[[0.0]], **kw)
    for bad in (3, [1, 2], [], ["a", 2]):
        with pytest.raises(SamplingError, match="prompts must be"):
            engine.generate(model, prompts=bad, text_encoder=enc, **kw)
    with pytest.raises(SamplingError, match="height"):
        engine.generate(model, prompts=PROMPTS, text_encoder=enc, height=IMG + 1, **kw)
    with pytest.raises(SamplingError, match="VAE latents"):
        engine.generate(model, prompts=PROMPTS, text_encoder=enc, output_type="np", **SETTINGS)


def test_generate_other_size(model, enc, vae):
    arr = engine.generate(model, prompts=["a cat"], text_encoder=enc, vae=vae, output_type="np",
                          height=IMG, width=2 * IMG, generator=gens(0), **SETTINGS)
    assert arr.shape == (1, IMG, 2 * IMG, 3)


def test_cli_samples_prompts_into_a_captioned_grid(assets, model, tmp_path):
    """`engine sample --checkpoint DIR --prompt ... --text-encoder DIR --vae DIR --height H
    --width W`: a grid with each prompt above its image, and the .npz equal to the API's."""
    from PIL import Image

    from engine.cli import main
    from engine.loading import save_engine_dir

    ckpt = save_engine_dir(model.mar.state_dict(), model.config, tmp_path / "fluid")
    common = ["sample", "--checkpoint", str(ckpt), "--text-encoder", str(assets["t5"]),
              "--vae", str(assets["sd"]), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
              "--height", "8", "--width", "12", "--num-iter", "3", "--cfg", "2", "--seed", "4",
              "--backend", "reference"]
    assert main(common + ["--out", str(tmp_path / "t2i.png")]) == 0
    with Image.open(tmp_path / "t2i.png") as im:
        assert im.width >= 2 * 160 and im.height > 12   # two captioned cells
    assert main(common + ["--out", str(tmp_path / "t2i.npz")]) == 0
    data = np.load(tmp_path / "t2i.npz")
    assert data["prompts"].tolist() == PROMPTS and data["images"].shape == (2, 8, 12, 3)
    loaded = engine.load(ckpt, backend="reference")
    enc = engine.load_text_encoder(assets["t5"], max_length=loaded.config.max_length)
    want = loaded.sample_tokens(2, texts=enc(PROMPTS), height=8, width=12, num_iter=3, cfg=2.0,
                                generator=gens(4, 5))
    assert np.allclose(data["tokens"], want.numpy(), rtol=1e-5, atol=1e-5)
    # Class labels are refused for a text-to-image model (one line, exit code 2).
    assert main(["sample", "--checkpoint", str(ckpt), "--classes", "1", "--out", str(tmp_path / "x.png")]) == 2
