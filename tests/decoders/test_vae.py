"""KL-16 VAE decoder: golden output of the published decoder, and checkpoint-loading errors."""

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.core.errors import CheckpointError
from engine.decoders.vae import MAR_LATENT_SCALE, KLDecoder, load_vae


def golden_dir() -> Path:
    """``../shared/golden/mar_small`` beside the checkout; missing golden data is a failure."""
    path = Path(__file__).resolve().parents[3] / "shared" / "golden" / "mar_small"
    assert (path / "golden.json").is_file() and (path / "golden.safetensors").is_file(), (
        f"golden data not found at {path} (expected ../shared/golden/mar_small beside the checkout)")
    return path


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def manifest():
    return [(k, tuple(s)) for k, s in json.loads((golden_dir() / "golden.json").read_text())["vae_manifest"]]


@pytest.fixture(scope="module")
def full_sd(manifest):
    """The golden VAE weights, rebuilt as the golden README prescribes (full AutoencoderKL)."""
    sd = {}
    for k, (key, shape) in enumerate(manifest):
        g = torch.Generator().manual_seed(k)
        x = torch.randn(shape, generator=g)
        if len(shape) == 1:
            sd[key] = 1 + 0.1 * x if key.endswith("weight") else 0.02 * x
        else:
            sd[key] = x / math.sqrt(math.prod(shape[1:]))
    return sd


@pytest.fixture(scope="module")
def decoder_sd(full_sd):
    return {k: v for k, v in full_sd.items() if k.startswith(("decoder.", "post_quant_conv."))}


def test_module_keys_match_manifest(manifest):
    want = [(k, s) for k, s in manifest if k.startswith(("decoder.", "post_quant_conv."))]
    have = [(k, tuple(v.shape)) for k, v in KLDecoder().state_dict().items()]
    assert sorted(have) == sorted(want)


def test_golden_decode(tmp_path, full_sd):
    ckpt = tmp_path / "kl16.ckpt"
    torch.save({"model": full_sd}, ckpt)
    vae = load_vae(ckpt)
    assert not vae.training
    t = load_file(str(golden_dir() / "golden.safetensors"))
    latent, image = t["vae.latent"], t["vae.image"]
    with torch.no_grad():
        out = vae.decode(latent)  # the golden image is decode(latent), without the MAR scaling
        assert out.shape == image.shape == (1, 3, 64, 64)
        assert rel_err(out, image) <= 1e-4
        assert rel_err(vae.decode_tokens(latent * MAR_LATENT_SCALE), image) <= 1e-4


def test_accepts_state_dict_key_bare_dict_and_namespace(tmp_path, decoder_sd):
    ckpt = tmp_path / "a.ckpt"
    torch.save({"state_dict": decoder_sd, "args": argparse.Namespace(embed_dim=16)}, ckpt)
    a = load_vae(ckpt).state_dict()
    torch.save(decoder_sd, ckpt)
    b = load_vae(ckpt, dtype=torch.float64).state_dict()
    assert b["decoder.conv_out.weight"].dtype == torch.float64
    for k, v in decoder_sd.items():
        assert torch.equal(a[k], v) and torch.equal(b[k].float(), v)


# ---- errors ---------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nope.ckpt"):
        load_vae(tmp_path / "nope.ckpt")


def test_not_a_torch_checkpoint(tmp_path):
    bad = tmp_path / "garbage.ckpt"
    bad.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError, match="garbage.ckpt.*not a readable torch checkpoint"):
        load_vae(bad)


def test_truncated_file(tmp_path):
    ckpt = tmp_path / "cut.ckpt"
    torch.save({"model": {"decoder.conv_in.weight": torch.randn(512, 16, 3, 3)}}, ckpt)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.ckpt.*not a readable torch checkpoint"):
        load_vae(ckpt)


class _Arbitrary:  # an object weights_only loading must refuse
    pass


def test_arbitrary_pickle_refused(tmp_path):
    ckpt = tmp_path / "obj.ckpt"
    torch.save({"model": {}, "extra": _Arbitrary()}, ckpt)
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_vae(ckpt)


def test_no_decoder_keys(tmp_path):
    ckpt = tmp_path / "mar.pth"
    torch.save({"model": {"encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
                          "class_emb.weight": torch.zeros(10, 8)}}, ckpt)
    with pytest.raises(CheckpointError, match="not a KL-16 VAE checkpoint"):
        load_vae(ckpt)


def test_missing_keys(tmp_path, decoder_sd):
    ckpt = tmp_path / "m.ckpt"
    sd = {k: v for k, v in decoder_sd.items() if k != "decoder.mid.attn_1.q.weight"}
    torch.save({"model": sd}, ckpt)
    with pytest.raises(CheckpointError, match=r"1 missing .*decoder\.mid\.attn_1\.q\.weight"):
        load_vae(ckpt)


def test_unexpected_decoder_key(tmp_path, decoder_sd):
    ckpt = tmp_path / "u.ckpt"
    torch.save({"model": {**decoder_sd, "decoder.up.0.upsample.conv.weight": torch.zeros(128, 128, 3, 3)}}, ckpt)
    with pytest.raises(CheckpointError, match=r"unexpected .*decoder\.up\.0\.upsample\.conv\.weight"):
        load_vae(ckpt)


def test_shape_mismatch(tmp_path, decoder_sd):
    ckpt = tmp_path / "s.ckpt"
    torch.save({"model": {**decoder_sd, "decoder.conv_out.bias": torch.zeros(4)}}, ckpt)
    with pytest.raises(CheckpointError,
                       match=r"shape mismatch for decoder\.conv_out\.bias: expected \[3\], found \[4\]"):
        load_vae(ckpt)
