"""The SD-3.5-style 16-channel VAE that LightGen decodes Fluid tokens with: diffusers'
`AutoencoderKL` from a local directory (never downloaded), decoding
`tokens / scaling_factor + shift_factor` as LightGen's pipeline does."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.errors import CheckpointError, SamplingError

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _class_name(config: Path):
    """The model class a config.json records (diffusers' `_class_name`, transformers'
    architectures / model_type), or None when it records none."""
    try:
        values = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{config}: unreadable config.json ({type(err).__name__}: {err})") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{config}: config.json does not hold a JSON object")
    if "_class_name" in values:
        return values["_class_name"]
    if "model_type" in values or "architectures" in values:   # a transformers model's config
        archs = values.get("architectures") or [values.get("model_type")]
        return f"transformers {'/'.join(map(str, archs))} model"
    return None


def vae_dir(path: Path) -> Path:
    """`path` itself, or its `vae/` subfolder (a whole pipeline directory, as LightGen passes)."""
    found = []
    for candidate in (path, path / "vae"):
        config = candidate / "config.json"
        if config.is_file():
            name = _class_name(config)
            if name in (None, "AutoencoderKL"):
                return candidate
            found.append(f"{config} describes a {name}")
    if found:
        raise CheckpointError(f"{path} is not a diffusers AutoencoderKL directory: "
                              + "; ".join(found))
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
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 4:
            raise SamplingError(f"the VAE decodes latents [B, {self.latent_channels}, h, w], got "
                                f"{list(getattr(tokens, 'shape', [])) or type(tokens).__name__}")
        if tokens.shape[1] != self.latent_channels:
            raise SamplingError(f"the VAE decodes {self.latent_channels}-channel latents, got "
                                f"{tokens.shape[1]} channels (tokens of a model with vae_embed_dim="
                                f"{tokens.shape[1]}: use the VAE that model was trained with)")
        dtype = next(self.vae.parameters()).dtype
        return self.vae.decode((tokens / self.scaling_factor + self.shift_factor).to(dtype)).sample.float()


def _plain_load_without_accelerate() -> dict:
    """Without `accelerate`, diffusers falls back to a plain load anyway but logs a warning
    about it on every call; ask for the plain load directly."""
    import importlib.util

    return {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}


def load_sd_vae(path, device="cpu", dtype=torch.float32) -> SDVAEDecoder:
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise CheckpointError(f"this VAE needs diffusers (pip install 'engine[text]'): {err}") from None
    folder = vae_dir(Path(path))
    if not any((folder / f).exists() for f in WEIGHT_FILES):
        raise CheckpointError(f"{folder} has a config.json but no weights ({' or '.join(WEIGHT_FILES)})")
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype,
                                            **_plain_load_without_accelerate())
    except Exception as err:  # noqa: BLE001  (safetensors / torch / json errors all mean: unusable)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"{folder}: cannot load the AutoencoderKL: {type(err).__name__}: "
                              f"{first}") from None
    for name, p in vae.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"{folder}: VAE tensor {name!r} holds NaN or Inf values")
    return SDVAEDecoder(vae.eval().requires_grad_(False).to(device))
