"""The SD-3.5-style 16-channel VAE that LightGen decodes Fluid tokens with: diffusers'
`AutoencoderKL` from a local directory (never downloaded), decoding
`tokens / scaling_factor + shift_factor` as LightGen's pipeline does."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def vae_dir(path: Path) -> Path:
    """`path` itself, or its `vae/` subfolder (a whole pipeline directory, as LightGen passes)."""
    for candidate in (path, path / "vae"):
        if (candidate / "config.json").exists():
            return candidate
    raise CheckpointError(f"{path} is not a diffusers AutoencoderKL directory: no config.json "
                          "there or in vae/")


class SDVAEDecoder:
    """tokens [B, C, h, w] (as Fluid samples them) -> images [B, 3, H, W] in about [-1, 1]."""

    def __init__(self, vae):
        self.vae = vae
        cfg = vae.config
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.shift_factor) if getattr(cfg, "shift_factor", None) is not None else 0.0
        self.latent_channels = int(cfg.latent_channels)

    def parameters(self):
        return self.vae.parameters()

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] != self.latent_channels:
            raise CheckpointError(f"the VAE decodes {self.latent_channels}-channel latents, got "
                                  f"{tokens.shape[1]} channels")
        dtype = next(self.vae.parameters()).dtype
        return self.vae.decode((tokens / self.scaling_factor + self.shift_factor).to(dtype)).sample.float()


def load_sd_vae(path, device="cpu", dtype=torch.float32) -> SDVAEDecoder:
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise CheckpointError(f"this VAE needs diffusers (pip install 'engine[text]'): {err}") from None
    folder = vae_dir(Path(path))
    if not any((folder / f).exists() for f in WEIGHT_FILES):
        raise CheckpointError(f"{folder} has a config.json but no weights ({' or '.join(WEIGHT_FILES)})")
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{folder}: cannot load the AutoencoderKL: {first}") from None
    for name, p in vae.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"{folder}: VAE tensor {name!r} holds NaN or Inf values")
    return SDVAEDecoder(vae.eval().requires_grad_(False).to(device))
