"""Tokens -> images (through the KL-16 VAE or straight from pixel tokens), output types, grids."""
from __future__ import annotations

import math

import numpy as np
import torch

from .errors import SamplingError

OUTPUT_TYPES = ("pil", "np", "pt")


def tokens_to_images(model, tokens: torch.Tensor, vae=None) -> torch.Tensor:
    """[N, C, H, W] float32 images in [0, 1]."""
    if model.config.tokenizer == "pixels":
        if vae is not None:
            raise SamplingError("this model generates pixels directly; pass vae=None")
        images = tokens
    else:
        if vae is None:
            raise SamplingError("this model generates KL-16 latents: pass vae=engine.load_vae(path) "
                                "to decode them, or use model.sample_tokens for the latents")
        with torch.no_grad():
            images = vae.decode_tokens(tokens.to(next(vae.parameters()).device))
    return ((images.float() + 1) / 2).clamp(0, 1)


def convert_output(images: torch.Tensor, output_type: str):
    if output_type == "pt":
        return images.cpu()
    arr = images.cpu().permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return arr
    from PIL import Image

    return [Image.fromarray(to_uint8(a[..., 0] if a.shape[-1] == 1 else a)) for a in arr]


def to_uint8(arr: np.ndarray) -> np.ndarray:
    return (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)


def make_grid(images, nrow: int | None = None, padding: int = 2, scale: int = 1):
    """A PIL grid of images given as `np` output [N, H, W, C] in [0, 1] or a list of PIL images."""
    from PIL import Image

    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
        if images.ndim == 3:
            images = images[..., None]
    images = np.asarray(images, dtype=np.float32)
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.ones((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), np.float32)
    for k in range(n):
        r, col = divmod(k, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = images[k]
    pil = Image.fromarray(to_uint8(grid[..., 0] if c == 1 else grid))
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    return pil


def save_grid(images, path, nrow: int | None = None, scale: int = 1):
    grid = make_grid(images, nrow=nrow, scale=scale)
    grid.save(path)
    return grid
