"""The 1000-step cosine DDPM schedule, its respacing, and the float32 tables sampling reads.

All tables are computed in float64 (as the published code does with numpy) and handed to the
sampler as float32 tensors, so every backend reads exactly the same coefficients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..core.errors import ConfigError

NUM_TRAIN_TIMESTEPS = 1000


def cosine_betas(num_steps: int = NUM_TRAIN_TIMESTEPS, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)], dtype=np.float64)


def space_timesteps(num_steps: int, respacing: str | int) -> list[int]:
    """Kept original timesteps, ascending, for a respacing string ("100", "ddim25", "10,5")."""
    spec = str(respacing).strip()
    if spec == "":
        return list(range(num_steps))
    if spec.startswith("ddim"):
        try:
            want = int(spec[4:])
        except ValueError:
            raise ConfigError(f"num_sampling_steps (--steps) {respacing!r}: expected 'ddimN' with an integer N") from None
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == want:
                return list(range(0, num_steps, stride))
        raise ConfigError(f"num_sampling_steps (--steps) {respacing!r}: no integer stride gives exactly {want} "
                          f"of {num_steps} steps")
    try:
        counts = [int(part) for part in spec.split(",")]
    except ValueError:
        raise ConfigError(f"num_sampling_steps (--steps) {respacing!r}: expected an integer, 'ddimN' or "
                          "comma-separated integers such as '10,5'") from None
    if any(c < 1 for c in counts):
        raise ConfigError(f"num_sampling_steps (--steps) {respacing!r}: every section needs at least one step")
    size_per, extra = divmod(num_steps, len(counts))
    if size_per == 0:
        raise ConfigError(f"num_sampling_steps (--steps) {respacing!r}: more sections than the {num_steps} steps")
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ConfigError(f"num_sampling_steps (--steps) {respacing!r}: cannot take {count} steps from a "
                              f"section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cursor = 0.0
        for _ in range(count):
            kept.append(start + round(cursor))
            cursor += stride
        start += size
    return sorted(set(kept))


@dataclass(frozen=True)
class DiffusionTables:
    """Per respaced index i: the coefficients of one reverse step, float64 numpy."""

    timestep_map: np.ndarray        # original timestep of respaced index i (int64)
    betas: np.ndarray
    sqrt_recip_ab: np.ndarray       # sqrt(1/ab)
    sqrt_recipm1_ab: np.ndarray     # sqrt(1/ab - 1)
    coef1: np.ndarray               # posterior mean coefficient of x0
    coef2: np.ndarray               # posterior mean coefficient of x_t
    min_log: np.ndarray             # clipped log posterior variance
    max_log: np.ndarray             # log(beta)

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    def as_tensor(self, device=None) -> torch.Tensor:
        """[T, 7] float32 rows (sqrt_recip, sqrt_recipm1, coef1, coef2, min_log, max_log, i>0)."""
        nonzero = (np.arange(self.num_steps) > 0).astype(np.float64)
        cols = [self.sqrt_recip_ab, self.sqrt_recipm1_ab, self.coef1, self.coef2,
                self.min_log, self.max_log, nonzero]
        # Each column is rounded to float32 on its own, as the published code's
        # `torch.from_numpy(arr)[t].float()` does.
        return torch.stack([torch.from_numpy(c).float() for c in cols], dim=1).to(device)


TABLE_COLUMNS = ("sqrt_recip_ab", "sqrt_recipm1_ab", "coef1", "coef2", "min_log", "max_log", "nonzero")


def make_tables(respacing: str | int, num_train_steps: int = NUM_TRAIN_TIMESTEPS) -> DiffusionTables:
    base_ab = np.cumprod(1.0 - cosine_betas(num_train_steps))
    kept = space_timesteps(num_train_steps, respacing)
    betas, last = [], 1.0
    for t in kept:
        betas.append(1 - base_ab[t] / last)
        last = base_ab[t]
    betas = np.array(betas, dtype=np.float64)
    ab = np.cumprod(1.0 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
    if len(betas) > 1:
        min_log = np.log(np.append(post_var[1], post_var[1:]))
    else:
        # One step: the published table is empty and sampling would fail; the variance
        # never matters then (no noise is added at index 0), so keep a finite value.
        min_log = np.log(np.maximum(post_var, 1e-20))
    return DiffusionTables(
        timestep_map=np.array(kept, dtype=np.int64),
        betas=betas,
        sqrt_recip_ab=np.sqrt(1.0 / ab),
        sqrt_recipm1_ab=np.sqrt(1.0 / ab - 1),
        coef1=betas * np.sqrt(ab_prev) / (1.0 - ab),
        coef2=(1.0 - ab_prev) * np.sqrt(1.0 - betas) / (1.0 - ab),
        min_log=min_log,
        max_log=np.log(betas),
    )
