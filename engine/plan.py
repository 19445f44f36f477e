"""The static sampling plan: for a given (bsz, num_iter, seq_len, cfg, cfg_schedule) every step's
token counts and CFG scale are known before sampling starts, so each step has fixed shapes."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import SamplingError

CFG_SCHEDULES = ("linear", "constant")


@dataclass(frozen=True)
class PlanStep:
    step: int             # the published loop's step number s
    unknown_before: int   # unknown tokens per image before the step
    unknown_after: int    # unknown tokens per image after it (0 at the last step)
    cfg_scale: float      # guidance scale of this step (float32-exact); 1.0 without CFG

    @property
    def num_predict(self) -> int:
        return self.unknown_before - self.unknown_after


@dataclass(frozen=True)
class SamplingPlan:
    bsz: int
    num_iter: int
    seq_len: int
    cfg: float
    cfg_schedule: str
    steps: tuple[PlanStep, ...]

    @property
    def use_cfg(self) -> bool:
        return self.cfg != 1.0

    def known_count(self, step: PlanStep) -> int:
        return self.seq_len - step.unknown_before

    def indices(self, step: PlanStep, orders: torch.Tensor):
        """Known and predicted positions [B', k] and [B', n], ascending, from `orders [B, L]`.

        Positions `orders[:, :m]` are the m still unknown; sorting keeps rows in position order,
        as the published masked gathers do. With CFG both are repeated for the second half."""
        known = torch.sort(orders[:, step.unknown_before:], dim=1).values
        predict = torch.sort(orders[:, step.unknown_after:step.unknown_before], dim=1).values
        if self.use_cfg:
            known, predict = known.repeat(2, 1), predict.repeat(2, 1)
        return known, predict


def mask_schedule(seq_len: int, num_iter: int) -> list[tuple[int, int, int]]:
    """(unknown_before, unknown_after, mask_len) for every published step, empty ones included.

    mask_len is the published value (>= 1 even at the last step); it sets the linear CFG scale."""
    out, unknown = [], seq_len
    for step in range(num_iter):
        ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
        mask_len = int(max(1, min(unknown - 1, np.floor(seq_len * ratio))))
        after = 0 if step >= num_iter - 1 else mask_len
        out.append((unknown, after, mask_len))
        unknown = after
    return out


def cfg_scale(cfg: float, schedule: str, mask_len: int, seq_len: int) -> float:
    """The step's guidance scale, rounded as the published float32 tensor arithmetic rounds
    `1 + (cfg - 1) * (L - mask_len) / L` (each operation in float32)."""
    f32 = np.float32
    if schedule == "constant":
        return float(f32(cfg))
    remaining = f32(seq_len) - f32(mask_len)
    return float(f32(1) + f32(f32(f32(cfg - 1) * remaining) / f32(seq_len)))


def validate_plan_args(bsz, num_iter, seq_len, cfg, cfg_schedule) -> None:
    for name, value in (("bsz", bsz), ("num_iter", num_iter)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise SamplingError(f"{name} must be an integer, got {value!r}")
        if value < 1:
            raise SamplingError(f"{name} must be at least 1, got {value}")
    if cfg_schedule not in CFG_SCHEDULES:
        raise SamplingError(f"unknown cfg_schedule {cfg_schedule!r}; expected one of {CFG_SCHEDULES}")
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float, np.floating, np.integer)) \
            or not math.isfinite(cfg):
        raise SamplingError(f"cfg must be a finite number, got {cfg!r}")


@functools.lru_cache(maxsize=256)
def build_plan(bsz: int, num_iter: int, seq_len: int, cfg: float = 1.0,
               cfg_schedule: str = "linear") -> SamplingPlan:
    """Plan of the published loop. Steps that would predict nothing (num_iter > seq_len; the
    published code crashes on them) are dropped: they draw no random numbers."""
    validate_plan_args(bsz, num_iter, seq_len, cfg, cfg_schedule)
    cfg = float(cfg)
    steps = []
    for s, (before, after, mask_len) in enumerate(mask_schedule(seq_len, num_iter)):
        if before == after:
            continue
        scale = cfg_scale(cfg, cfg_schedule, mask_len, seq_len) if cfg != 1.0 else 1.0
        steps.append(PlanStep(s, before, after, scale))
    return SamplingPlan(int(bsz), int(num_iter), seq_len, cfg, cfg_schedule, tuple(steps))
