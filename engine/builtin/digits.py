"""The handwritten digits that scikit-learn ships (1,797 real 8x8 scans, 10 classes; no download),
with the fixed train / held-out split the built-in model and its quality report use.

Images come back as float32 tensors [N, 1, H, W] in [-1, 1] (the pixel-token range), at the
native 8x8 or bilinearly upsampled (16x16 for the built-in model)."""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import EngineError

NUM_CLASSES = 10
NATIVE_SIZE = 8
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - depends on the environment
        raise EngineError("the digits data come with scikit-learn: pip install scikit-learn "
                          "(or pip install 'engine[digits]')") from None
    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices into the 1,797 images: stratified, 20% held out, seed 0.

    Written out here rather than with sklearn's splitter so that the split cannot change with
    a scikit-learn release: within each class the indices are shuffled by a fixed numpy
    generator and the first round(20%) of them are held out."""
    _, labels = _raw()
    rng = np.random.Generator(np.random.PCG64(SPLIT_SEED))
    train, held = [], []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_held = int(round(HELD_OUT_FRACTION * len(idx)))
        held.append(idx[:n_held])
        train.append(idx[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def to_model_range(images: np.ndarray, size: int) -> torch.Tensor:
    """Digits scans (values 0..16, [N, 8, 8]) -> [N, 1, size, size] float32 in [-1, 1]."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32)).reshape(-1, 1, NATIVE_SIZE, NATIVE_SIZE)
    x = x / 8.0 - 1.0
    if size != NATIVE_SIZE:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(-1.0, 1.0).contiguous()


def load_split(split: str = "train", size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, size, size] in [-1, 1], labels [N] int64) of the "train", "heldout" or
    "all" split."""
    if size < 1:
        raise EngineError(f"image size must be positive, got {size}")
    images, labels = _raw()
    train, held = split_indices()
    index = {"train": train, "heldout": held, "all": np.arange(len(labels))}.get(split)
    if index is None:
        raise EngineError(f"unknown split {split!r}; expected 'train', 'heldout' or 'all'")
    return to_model_range(images[index], size), torch.from_numpy(labels[index])


def per_class_subset(labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of `per_class` examples of every class (fewer where a class has fewer), chosen
    by a fixed generator; sorted by class."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)][:per_class]
        out.append(torch.sort(idx).values)
    return torch.cat(out)
