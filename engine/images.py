"""Tokens -> images (through a VAE: MAR's KL-16, Fluid's SD-3.5 AutoencoderKL; or straight from
pixel tokens), output types, grids."""
from __future__ import annotations

import math

import numpy as np
import torch

from .core.errors import SamplingError

OUTPUT_TYPES = ("pil", "np", "pt")


def tokens_to_images(model, tokens: torch.Tensor, vae=None) -> torch.Tensor:
    """[N, C, H, W] float32 images in [0, 1]."""
    if model.config.tokenizer == "pixels":
        if vae is not None:
            raise SamplingError("this model generates pixels directly; pass vae=None")
        images = tokens
    else:
        if vae is None:
            raise SamplingError("this model generates VAE latents: pass vae=engine.load_vae(path) "
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


LABELLED_ROW = 10


def labelled_grid(images, labels, scale: int = 1, padding: int = 2):
    """A PIL grid of `images` ([N, H, W, C] in [0, 1], engine.generate's "np" output) with their
    class labels written on it: one row per class with the label at its left when a class has
    several samples, else rows of up to ten images with each label above its image."""
    from PIL import Image, ImageDraw

    images = np.asarray(images, dtype=np.float32)
    labels = [int(x) for x in labels]
    if len(labels) != len(images):
        raise SamplingError(f"{len(images)} images but {len(labels)} labels")
    classes = list(dict.fromkeys(labels))
    per_class = max(labels.count(c) for c in classes)
    h, w, c = images.shape[1:]
    cell_h, cell_w = (h + padding) * scale, (w + padding) * scale
    font_size = max(12, min(cell_h, cell_w) // 4)
    if per_class == 1:  # rows of up to `LABELLED_ROW` images, each under a band with its label
        band = font_size + 8
        rows = [make_grid(images[k:k + LABELLED_ROW], nrow=min(len(images), LABELLED_ROW),
                          padding=padding, scale=scale) for k in range(0, len(images), LABELLED_ROW)]
        grid = Image.new(rows[0].mode, (rows[0].width, len(rows) * (rows[0].height + band)), "white")
        centers = []
        for r, row in enumerate(rows):
            grid.paste(row, (0, r * (row.height + band) + band))
            centers += [(padding * scale + k * cell_w + w * scale // 2, r * (row.height + band) + band // 2)
                        for k in range(min(LABELLED_ROW, len(labels) - r * LABELLED_ROW))]
        origin = (0, 0)
        texts = [str(lbl) for lbl in labels]
    else:
        blank = np.zeros((h, w, c), np.float32)
        ordered = []
        for cls in classes:
            row = [images[i] for i, lbl in enumerate(labels) if lbl == cls]
            ordered += row + [blank] * (per_class - len(row))
        grid = make_grid(np.stack(ordered), nrow=per_class, padding=padding, scale=scale)
        width = max(len(str(cls)) for cls in classes)
        origin = (width * font_size * 2 // 3 + 12, 0)
        centers = [(origin[0] // 2, padding * scale + r * cell_h + h * scale // 2) for r in range(len(classes))]
        texts = [str(cls) for cls in classes]
    out = Image.new(grid.mode, (grid.width + origin[0], grid.height + origin[1]), "white")
    out.paste(grid, origin)
    draw = ImageDraw.Draw(out)
    try:
        from PIL import ImageFont
        font = ImageFont.load_default(size=font_size)
    except (TypeError, OSError):  # Pillow < 10.1 (or no FreeType): the fixed bitmap font
        font = None
    for (x, y), text in zip(centers, texts):
        draw.text((x, y), text, fill="black", anchor="mm", font=font)
    return out


def captioned_grid(images, captions, scale: int = 1, padding: int = 2, ncol: int | None = None):
    """A PIL grid of `images` ([N, H, W, C] in [0, 1]) with each caption (e.g. its prompt)
    written above its image, wrapped to the image's width."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    images = np.asarray(images, dtype=np.float32)
    captions = [str(c) for c in captions]
    if len(captions) != len(images):
        raise SamplingError(f"{len(images)} images but {len(captions)} captions")
    n, h, w, _ = images.shape
    ncol = ncol or min(n, 4)
    cell_w = max(w * scale, 160) + 2 * padding
    font_size = 12
    try:
        font = ImageFont.load_default(size=font_size)
    except (TypeError, OSError):  # Pillow < 10.1: the fixed bitmap font
        font = None
    chars = max(8, (cell_w - 2 * padding) * 10 // (6 * font_size))
    wrapped = [textwrap.wrap(c, chars) or [""] for c in captions]
    band = (font_size + 3) * max(len(lines) for lines in wrapped) + 6
    cell_h = band + h * scale + 2 * padding
    rows = math.ceil(n / ncol)
    out = Image.new("RGB", (ncol * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(out)
    for k in range(n):
        r, col = divmod(k, ncol)
        x0, y0 = col * cell_w, r * cell_h
        tile = make_grid(images[k:k + 1], nrow=1, padding=0, scale=scale).convert("RGB")
        out.paste(tile, (x0 + (cell_w - tile.width) // 2, y0 + band + padding))
        for i, line in enumerate(wrapped[k]):
            draw.text((x0 + cell_w // 2, y0 + 4 + i * (font_size + 3)), line, fill="black", anchor="mt", font=font)
    return out
