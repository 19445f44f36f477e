"""Tiny local stand-ins for LightGen's text-to-image assets, built in a directory (nothing is
downloaded): a random T5 encoder with a Hugging Face tokenizer (what engine.load_text_encoder
reads) and a random 16-channel diffusers AutoencoderKL with SD-3.5-style scaling / shift
factors (what engine.load_vae reads from a directory)."""
from __future__ import annotations

from pathlib import Path

import torch

# T5 sizes: d_model is the model's caption_channels.
T5_D_MODEL = 12
WORDS = ("a", "cat", "two", "dogs", "on", "the", "red", "blue", "mat", "sitting", "big", "small",
         "house", "tree", "of", "and")
SPECIAL = ("<pad>", "</s>", "<unk>")        # ids 0, 1, 2, as T5's
VOCAB = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}

# VAE sizes: two block_out_channels -> one 2x down/upsampling, so tokens [B, 16, h, w] decode to
# images [B, 3, 2h, 2w].
VAE_LATENT_CHANNELS = 16
VAE_SCALE = 2
SCALING_FACTOR = 1.5305
SHIFT_FACTOR = 0.0609


def build_tokenizer():
    """A WordLevel tokenizer over WORDS (engine.decoders.text.word_tokenizer: the built-in text model's kind)."""
    from engine.decoders.text import word_tokenizer

    return word_tokenizer(WORDS)


def build_t5_encoder(seed: int = 0):
    """A random T5EncoderModel (1 layer, 2 heads); weights drawn from one seeded generator."""
    from engine.decoders.text import random_t5_encoder

    return random_t5_encoder(len(VOCAB), seed, d_model=T5_D_MODEL, d_kv=6, d_ff=24, num_layers=1, num_heads=2)


def make_t5_dir(root, seed: int = 0) -> Path:
    """root/t5: config.json, model.safetensors, tokenizer.json (+ tokenizer_config.json ...)."""
    out = Path(root) / "t5"
    out.mkdir(parents=True, exist_ok=True)
    build_t5_encoder(seed).save_pretrained(str(out), safe_serialization=True)
    build_tokenizer().save_pretrained(str(out))
    return out


def build_vae(seed: int = 0):
    """A random 16-channel AutoencoderKL with SD-3.5-style scaling and shift factors."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                        latent_channels=VAE_LATENT_CHANNELS, sample_size=16,
                        scaling_factor=SCALING_FACTOR, shift_factor=SHIFT_FACTOR,
                        use_quant_conv=False, use_post_quant_conv=False)
    return vae.eval()


def make_vae_dir(root, seed: int = 0) -> Path:
    """root/sd (a pipeline-like directory) with the VAE in root/sd/vae; returns root/sd."""
    pipe = Path(root) / "sd"
    build_vae(seed).save_pretrained(str(pipe / "vae"), safe_serialization=True)
    return pipe
