"""engine: a fast, exact sampler for masked-autoregressive (MAR) image generators.

    model = engine.load("checkpoint-last.pth")            # published MAR checkpoint
    tokens = model.sample_tokens(4, num_iter=64, cfg=3.0, labels=[207, 360, 387, 974])
    images = engine.generate(model, [207, 360], vae=engine.load_vae("kl16.ckpt"))
"""
from __future__ import annotations

import torch

from .config import MARConfig, PRESETS
from .errors import CheckpointError, ConfigError, EngineError, SamplingError
from .images import labelled_grid, make_grid, save_grid
from .model import MARModel

__version__ = "0.1.0"
__all__ = ["load", "load_vae", "generate", "accelerate", "patch", "convert", "make_grid",
           "save_grid", "labelled_grid", "MARModel", "MARConfig", "PRESETS", "EngineError",
           "CheckpointError", "ConfigError", "SamplingError"]


def load(path, ema: bool = True, device="cpu", backend="auto", num_sampling_steps=None,
         precision: str = "fp32", cuda_graphs: bool = True, **config) -> MARModel:
    """Load a published `checkpoint-last.pth`, an engine model directory, or a built-in model
    ("digits"). Keyword arguments supply or override configuration fields.

    backend: "auto" (fastest available), "reference", "native" (CPU), "triton" (GPU), or a
    HeadBackend instance. precision: "fp32" (published tokens), "bf16" (CPU or CUDA) or "fp16"
    (CUDA); cuda_graphs applies on CUDA."""
    from .loading import build_mar, read_checkpoint

    if num_sampling_steps is not None:
        config["num_sampling_steps"] = str(num_sampling_steps)
    check_device(device)
    state, cfg, sampling_defaults = read_checkpoint(path, ema=ema, **config)
    mar = build_mar(state, cfg, str(path)).to(device)
    model = MARModel(mar, backend=backend, cuda_graphs=cuda_graphs, precision=precision)
    model.sampling_defaults = dict(sampling_defaults)
    return model


def check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"bad device {device!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} requested but no CUDA device is available "
                          "(torch.cuda.is_available() is False); use device='cpu'")
    return device


def load_vae(path, device="cpu", dtype=torch.float32):
    """Load the KL-16 VAE decoder from `kl16.ckpt`."""
    from .models.vae import load_vae as _load_vae

    check_device(device)
    return _load_vae(path, device=device, dtype=dtype)


def generate(model: MARModel, labels=None, vae=None, num_images: int | None = None, num_iter: int = 64,
             cfg: float = 1.0, cfg_schedule: str = "linear", temperature: float = 1.0,
             generator=None, progress: bool = False, output_type: str = "pil"):
    """Images for `labels` (one per label; or `num_images` unconditional ones with labels=None).

    output_type "pil": list of PIL images; "np": float array [N, H, W, channels] in [0, 1];
    "pt": float tensor [N, channels, H, W] in [0, 1]. `vae` decodes latent-token models; pixel
    models need none."""
    from .images import OUTPUT_TYPES, convert_output, tokens_to_images

    if output_type not in OUTPUT_TYPES:
        raise SamplingError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if labels is None:
        if num_images is None:
            raise SamplingError("pass labels, or num_images for unconditional samples")
        bsz = num_images
    else:
        labels = list(labels.tolist() if hasattr(labels, "tolist") else labels)
        if num_images is not None and num_images != len(labels):
            raise SamplingError(f"num_images={num_images} but {len(labels)} labels")
        bsz = len(labels)
    tokens = model.sample_tokens(bsz, num_iter=num_iter, cfg=cfg, cfg_schedule=cfg_schedule,
                                 labels=labels, temperature=temperature, progress=progress,
                                 generator=generator)
    return convert_output(tokens_to_images(model, tokens, vae), output_type)


def accelerate(published_model, backend="auto", num_sampling_steps=None, **config) -> MARModel:
    """An engine model from an instance of the published MAR class (same `sample_tokens` results)."""
    from .dropin import accelerate as _accelerate

    return _accelerate(published_model, backend=backend, num_sampling_steps=num_sampling_steps, **config)


def patch(published_model, backend="auto", num_sampling_steps=None, **config):
    """Replace the published model's `sample_tokens` with the engine's, in place."""
    from .dropin import patch as _patch

    return _patch(published_model, backend=backend, num_sampling_steps=num_sampling_steps, **config)


def convert(src, out_dir, ema: bool = True, **config):
    """Write a published checkpoint in the engine's format (safetensors + config.json)."""
    from .loading import convert as _convert

    return _convert(src, out_dir, ema=ema, **config)
