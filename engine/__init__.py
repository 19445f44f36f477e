"""engine: a fast, exact sampler for autoregressive image generators of six families (mar, fluid,
causal, elm-ar, elm-mlm, ctf), each through one family protocol (engine/core/protocol.py).

    model = engine.load("checkpoint-last.pth")            # published MAR checkpoint
    tokens = model.sample_tokens(4, num_iter=64, cfg=3.0, labels=[207, 360, 387, 974])
    images = engine.generate(model, [207, 360], vae=engine.load_vae("kl16.ckpt"))

    fluid = engine.load("fluid.pth")                      # LightGen (Fluid) checkpoint
    images = engine.generate(fluid, prompts=["a red apple"], vae=engine.load_vae("sd-3.5/"),
                             text_encoder=engine.load_text_encoder("flan-t5-xxl/"))

    elm = engine.load("L-2-10.pth", family="elm-ar")      # ELM AR (bare state dict), KV-cached
    images = engine.generate(elm, [207, 360], bae=engine.load_bae("bae_20/binaryae_ema.th"))
"""
from __future__ import annotations

import torch

from .core.config import MARConfig, PRESETS
from .core.errors import CheckpointError, ConfigError, EngineError, SamplingError
from .images import labelled_grid, make_grid, save_grid
from .core.protocol import labels_and_batch  # noqa: F401  (re-exported: the CLI and tests use it)
from .families.mar import MARModel
from .model import Model

__version__ = "0.1.0"
__all__ = ["load", "load_vae", "load_bae", "load_text_encoder", "generate", "accelerate", "patch", "convert", "make_grid",
           "save_grid", "labelled_grid", "Model", "MARModel", "MARConfig", "PRESETS", "EngineError",
           "CheckpointError", "ConfigError", "SamplingError"]


def load(path, ema: bool | None = None, device="cpu", backend="auto", num_sampling_steps=None,
         precision: str = "fp32", cuda_graphs: bool = True, family: str | None = None,
         **config) -> Model:
    """Load a published checkpoint (MAR's `checkpoint-last.pth`, a LightGen Fluid checkpoint),
    an engine model directory, or a built-in model ("digits", "digits-text"; an engine directory
    with a `text_encoder/` T5 directory sets `model.text_encoder`). The family is recognised from the
    checkpoint (its args' preset name, its keys) unless `family=` names it (engine.families.families()).
    Keyword arguments supply or override configuration fields (named as the published
    constructor's arguments). ema: True loads 'model_ema', False 'model'; by default the
    family's choice (MAR: 'model_ema'; Fluid: 'model', as LightGen's sampling scripts).

    backend: "auto" (fastest available), "reference", "native" (CPU), "triton" (GPU), or a
    HeadBackend instance. precision: "fp32" (published tokens), "bf16" (CPU or CUDA) or "fp16"
    (CUDA); cuda_graphs applies on CUDA."""
    from .families import family_of_config
    from .loading import BAE_DIR, build_module, companion_dir, companion_text_encoder, read_checkpoint

    from .families import get_family

    if num_sampling_steps is not None:
        config["num_sampling_steps"] = str(num_sampling_steps)
    for name, value in (("ema", ema), ("cuda_graphs", cuda_graphs)):
        if not (value is None and name == "ema") and not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False{' (or None)' if name == 'ema' else ''}, got {value!r:.80}")
    if family is not None:
        if not isinstance(family, str):
            raise ConfigError(f"family must be a family name, got {family!r:.80}")
        get_family(family)   # an unknown name, before reading any file
    check_device(device)
    state, cfg, sampling_defaults = read_checkpoint(path, ema=ema, family=family, **config)
    module = build_module(state, cfg, str(path)).to(device)
    model_cls = family_of_config(cfg).model_cls
    model = model_cls(module, backend=backend, cuda_graphs=cuda_graphs, precision=precision)
    model.sampling_defaults = dict(sampling_defaults)
    text_dir = companion_text_encoder(path)
    if text_dir is not None:   # a text-to-image engine directory that ships its own T5
        model.text_encoder = load_text_encoder(text_dir, max_length=cfg.max_length, device=device)
    bae_dir = companion_dir(path, BAE_DIR)
    if bae_dir is not None:    # a BAE-token engine directory that ships its decoder (digits-elm-ar)
        model.bae = load_bae(bae_dir, device=device)
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
    """A VAE decoder: MAR's KL-16 from `kl16.ckpt`, or a diffusers AutoencoderKL directory (the
    SD-3.5 VAE Fluid / LightGen decode with; a pipeline directory with `vae/` works too)."""
    import os
    from pathlib import Path

    check_device(device)
    if isinstance(path, (str, os.PathLike)) and Path(path).is_dir():
        from .decoders.sd_vae import load_sd_vae
        return load_sd_vae(path, device=device, dtype=dtype)
    from .decoders.vae import load_vae as _load_vae
    return _load_vae(path, device=device, dtype=dtype)


def load_bae(path, device="cpu"):
    """ELM's binary-autoencoder decoder from `binaryae_ema.th` (keys with or without the `ae.`
    prefix; layout read from the weights): `engine.generate(elm_model, labels, bae=...)`."""
    from .decoders.bae import load_bae as _load_bae

    check_device(device)
    return _load_bae(path, device=device)


def load_text_encoder(path, max_length: int = 128, device="cpu", dtype=torch.float32):
    """A local Hugging Face T5 encoder directory as LightGen uses it: prompts -> [B, max_length,
    d_model] (`last_hidden_state`, padded to max_length). Never downloads."""
    from .decoders.text import load_text_encoder as _load

    check_device(device)
    return _load(path, max_length=max_length, device=device, dtype=dtype)


def sampling_settings(model, **given) -> dict:
    """The caller's settings; where one is None, the model's recorded default (engine model
    directories record them), else the family's published one (model.resolve_settings)."""
    return model.resolve_settings(**given)


def generate(model: Model, labels=None, vae=None, num_images: int | None = None, num_iter=None,
             cfg=None, cfg_schedule=None, temperature=None, generator=None, progress: bool = False,
             output_type: str = "pil", prompts=None, text_encoder=None, texts=None,
             height: int | None = None, width: int | None = None, bae=None, top_k=None, top_p=None,
             fast=None):
    """Images for `labels` (class-conditional models; labels=None with `num_images` for
    unconditional ones) or for `prompts` (text-to-image models: encoded by `text_encoder`, or
    the model's own; or pass the encoder output as `texts`).

    Settings left as None take the model's recorded defaults (else the published ones).
    `generator`: one torch.Generator, or a list with one per image (image i then depends on
    generator i alone). output_type "pil": list of PIL images; "np": float array [N, H, W,
    channels] in [0, 1]; "pt": float tensor [N, channels, H, W] in [0, 1]. `vae` decodes
    latent-token models (engine.load_vae); pixel models need none. Models with binary tokens
    (ELM's, CTF) decode with `bae=engine.load_bae(path)` (or the one they ship) and also take
    `top_k` / `top_p`. `fast`: "exact" (the default: the published tokens) or an approximate
    mode the family has ("disa", "lazy", "speculative", joined by "+", or a dict of their
    parameters; docs/fast.md)."""
    from .images import OUTPUT_TYPES, convert_output

    if output_type not in OUTPUT_TYPES:
        raise SamplingError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    settings = {"num_iter": num_iter, "cfg": cfg, "cfg_schedule": cfg_schedule, "temperature": temperature,
                "top_k": top_k, "top_p": top_p, "fast": fast}
    images = model.generate_images(labels=labels, num_images=num_images, generator=generator, progress=progress,
                                   vae=vae, bae=bae, prompts=prompts, texts=texts, text_encoder=text_encoder,
                                   height=height, width=width, **settings)
    return convert_output(images, output_type)


def accelerate(published_model, backend="auto", num_sampling_steps=None, **config) -> MARModel:
    """An engine model from an instance of the published MAR class (same `sample_tokens` results),
    of LightGen's FLUID, or of ELM's AR or masked `Transformer` (same `generate_cfg` results)."""
    from .dropin import accelerate as _accelerate

    return _accelerate(published_model, backend=backend, num_sampling_steps=num_sampling_steps, **config)


def patch(published_model, backend="auto", num_sampling_steps=None, **config):
    """Replace the published model's `sample_tokens` with the engine's, in place."""
    from .dropin import patch as _patch

    return _patch(published_model, backend=backend, num_sampling_steps=num_sampling_steps, **config)


def convert(src, out_dir, ema: bool | None = None, family: str | None = None, force: bool = False,
            **config):
    """Write a published checkpoint in the engine's format (safetensors + config.json) as a new
    directory `out_dir`: its parent must exist, a non-empty `out_dir` is replaced only with
    `force=True`, and the write is all or nothing (a temporary directory beside it, renamed)."""
    from .loading import convert as _convert

    return _convert(src, out_dir, ema=ema, family=family, force=force, **config)
