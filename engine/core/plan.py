"""The static sampling plan: for a given batch, num_iter and sequence length every step's token
counts are known before sampling starts, so each step has fixed shapes. Per-image settings (cfg
scale and schedule, temperature) become per-row tensors; they never change a step's shapes, so
images with different settings share the plan, its compiled steps and its CUDA graphs."""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import SamplingError

CFG_SCHEDULES = ("linear", "constant")
# Documented limits, checked before anything is allocated or looped (see README "Limits").
MAX_BATCH = 65536
MAX_NUM_ITER = 65536
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class PlanStep:
    step: int             # the published loop's step number s
    unknown_before: int   # unknown tokens per image before the step
    unknown_after: int    # unknown tokens per image after it (0 at the last step)
    mask_len: int         # the published mask_len (>= 1 even at the last step): sets linear CFG
    cfg_scales: tuple     # guidance scale of each image at this step (float32-exact; 1.0 w/o CFG)
    head_steps: int | None = None   # diffusion steps of this step's head (fast "disa"); None: the model's
    lazy: bool = False    # fast "lazy": reuse the cached features of the previous full step
    refresh: bool = False  # fast "lazy": a full step whose next step is lazy (it fills the caches)
    cache_after: int = 0   # refresh steps: unknown_after of the last lazy step they fill the cache for
    new_known: int = 0     # lazy steps: tokens that became known at the previous step

    @property
    def num_predict(self) -> int:
        return self.unknown_before - self.unknown_after

    @property
    def cfg_scale(self) -> float:
        """The step's scale when every image shares one setting."""
        if len(set(self.cfg_scales)) != 1:
            raise SamplingError("the images of this plan have different cfg scales; read cfg_scales")
        return self.cfg_scales[0]


@dataclass(frozen=True)
class SamplingPlan:
    bsz: int
    num_iter: int
    seq_len: int
    cfgs: tuple           # per image
    cfg_schedules: tuple  # per image
    steps: tuple[PlanStep, ...]
    fast: object = None   # the FastMode the plan was built for (engine.core.fast); None: exact

    @property
    def use_cfg(self) -> bool:
        """Whether the batch runs doubled ([cond; null]): any image with cfg != 1."""
        return any(c != 1.0 for c in self.cfgs)

    @property
    def cfg(self) -> float:
        return self.cfgs[0]

    @property
    def cfg_schedule(self) -> str:
        return self.cfg_schedules[0]

    @property
    def shape_key(self) -> tuple:
        """What fixes every step's shapes: compiled steps and CUDA graphs are keyed by it."""
        key = (self.bsz, self.num_iter, self.seq_len, self.use_cfg)
        if self.fast is not None and not self.fast.exact:   # per-step head lengths / lazy steps
            key += (tuple((s.head_steps, s.lazy) for s in self.steps),)
        return key

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

    def cfg_table(self, device) -> torch.Tensor:
        """[steps, B] float32: image b's guidance scale at step k."""
        return torch.tensor([s.cfg_scales for s in self.steps], dtype=torch.float32, device=device)


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


def check_count(name: str, value, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SamplingError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise SamplingError(f"{name} must be at least 1, got {value}")
    if value > limit:
        raise SamplingError(f"{name}={value} exceeds the limit of {limit}")
    return int(value)


def check_cfg(cfg) -> float:
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float, np.floating, np.integer)) \
            or not math.isfinite(cfg) or abs(cfg) > FLOAT32_MAX:
        raise SamplingError(f"cfg must be a finite number (within float32 range), got {cfg!r}")
    return float(cfg)


def check_schedule(schedule) -> str:
    if schedule not in CFG_SCHEDULES:
        raise SamplingError(f"unknown cfg_schedule {schedule!r}; expected one of {CFG_SCHEDULES}")
    return schedule


def per_image(name: str, value, bsz: int, check) -> tuple:
    """One setting per image: a scalar is shared, a list/tuple/array gives one per image."""
    if isinstance(value, (list, tuple, np.ndarray, torch.Tensor)) and np.ndim(value) != 0:
        values = value.tolist() if hasattr(value, "tolist") else list(value)
        if len(values) != bsz:
            raise SamplingError(f"{name} has {len(values)} entries for {bsz} images")
        return tuple(check(v) for v in values)
    if isinstance(value, (np.ndarray, torch.Tensor)):
        value = value.item()
    return (check(value),) * bsz


def build_plan(bsz: int, num_iter: int, seq_len: int, cfg=1.0, cfg_schedule="linear", fast=None,
               model_steps: int | None = None) -> SamplingPlan:
    """Plan of the published loop; `cfg` and `cfg_schedule` are shared or one per image. Steps
    that would predict nothing (num_iter > seq_len; the published code crashes on them) are
    dropped: they draw no random numbers. `fast` (an engine.core.fast.FastMode): "disa" gives
    each step its diffusion-step count (capped at `model_steps`, the head's own), "lazy" marks
    the steps that reuse cached features; each step keeps static shapes."""
    bsz = check_count("bsz", bsz, MAX_BATCH)
    num_iter = check_count("num_iter", num_iter, MAX_NUM_ITER)
    cfgs = per_image("cfg", cfg, bsz, check_cfg)
    schedules = per_image("cfg_schedule", cfg_schedule, bsz, check_schedule)
    if fast is not None and fast.exact:
        fast = None
    if fast is not None and fast.disa is not None and model_steps is None:
        raise SamplingError("fast: disa needs the model's diffusion step count (model_steps)")
    if fast is None or fast.disa is None:
        model_steps = None   # an exact plan is the same object whatever head it runs
    return _build_plan(bsz, num_iter, int(seq_len), cfgs, schedules, fast, model_steps)


@functools.lru_cache(maxsize=256)
def _build_plan(bsz, num_iter, seq_len, cfgs, schedules, fast=None, model_steps=None) -> SamplingPlan:
    use_cfg = any(c != 1.0 for c in cfgs)
    steps = []
    for s, (before, after, mask_len) in enumerate(mask_schedule(seq_len, num_iter)):
        if before == after:
            continue
        with np.errstate(over="ignore"):
            scales = tuple(cfg_scale(c, sch, mask_len, seq_len) if use_cfg else 1.0
                           for c, sch in zip(cfgs, schedules))
        bad = [c for c, scale in zip(cfgs, scales) if not math.isfinite(scale)]
        if bad:
            raise SamplingError(f"cfg={bad[0]!r} with its schedule overflows float32 at step {s}")
        head_steps = lazy = None
        if fast is not None and fast.disa is not None:
            head_steps = fast.disa.steps(s, num_iter, model_steps)
            head_steps = None if head_steps == model_steps else head_steps
        # A lazy step reuses the previous step's caches: never the first step of a plan.
        lazy = bool(fast is not None and fast.lazy is not None and steps and not fast.lazy.fresh(s, num_iter))
        steps.append(PlanStep(s, before, after, mask_len, scales, head_steps, lazy))
    for i, st in enumerate(steps):   # a full step before lazy ones caches what they will read
        if not st.lazy and i + 1 < len(steps) and steps[i + 1].lazy:
            j = i + 1
            while j + 1 < len(steps) and steps[j + 1].lazy:
                j += 1
            steps[i] = dataclasses.replace(st, refresh=True, cache_after=steps[j].unknown_after)
        if st.lazy:
            steps[i] = dataclasses.replace(st, new_known=steps[i - 1].num_predict)
    return SamplingPlan(bsz, num_iter, seq_len, cfgs, schedules, tuple(steps), fast)
