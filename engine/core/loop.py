"""The masked-autoregressive loop, for every family: plan step -> the family's transformer pass
-> the backend's head loop -> scatter.

This is the only place the sampling math is written; a family supplies its transformer step and
step context (condition rows, per-resolution tables), backends only run the head loop."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from .conditioning import Condition
from .errors import SamplingError
from .protocol import SettingError, check_image_generator
from .plan import FLOAT32_MAX, PlanStep, build_plan, per_image
from .rng import _draw_one, check_generator, draw_step_inputs, draw_step_noise, randn, sample_orders  # noqa: F401


def validate_labels(labels, bsz: int, class_num: int, device) -> torch.Tensor | None:
    """Class labels as an int64 tensor on `device` (None stays None); see Condition.labels."""
    return Condition.labels(labels, bsz, class_num, device).value


def validate_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating, np.integer)) \
            or not math.isfinite(temperature) or temperature <= 0 or temperature > FLOAT32_MAX:
        raise SamplingError(f"temperature must be a finite number > 0 (within float32 range), got {temperature!r}")
    return float(temperature)


def transformer_pass(model, tokens_in, known, predict, context) -> torch.Tensor:
    """The family's transformer pass (under the model's autocast): z [B', n, D] float32 for the
    predicted positions `predict [B', n]`, given the known ones `known [B', k]`."""
    autocast = model.autocast_dtype
    with torch.autocast(tokens_in.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        z = model.mar.forward_step(tokens_in, known, predict, context)
    return z.float()


def scatter_tokens(tokens, predict, out) -> None:
    """Write the head's output `out [B*n, C]` into `tokens [B, L, C]` at `predict [B, n]`."""
    bsz, n = predict.shape
    index = predict.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    tokens.scatter_(1, index, out.reshape(bsz, n, tokens.shape[-1]).to(tokens.dtype))


def run_step(model, plan, step, tokens, orders, context, cfg_scales, temperatures, x, noise,
             lazy=None) -> None:
    """One plan step, in place on `tokens [B, L, C]`: gather known and predicted positions,
    transformer pass, the backend's head loop, scatter. `cfg_scales` and `temperatures` are [B]
    (per image; expanded to the image's predicted rows). Static shapes, no host synchronisation:
    this is what torch.compile(fullgraph=True) traces and what a CUDA graph captures. `lazy`:
    the call's LazyCache (fast "lazy" with CFG), else None."""
    bsz, n = plan.bsz, step.num_predict
    known, predict = plan.indices(step, orders)
    if lazy is not None and (step.lazy or step.refresh):
        z = lazy_pass(model, plan, step, tokens, orders, context, lazy)
    else:
        tokens_in = torch.cat([tokens, tokens]) if plan.use_cfg else tokens
        z = transformer_pass(model, tokens_in, known, predict, context)
    z = z.reshape(-1, z.shape[-1])
    temperature_rows = temperatures[:, None].expand(bsz, n).reshape(-1)
    scale_rows = cfg_scales[:, None].expand(bsz, n).reshape(-1) if plan.use_cfg else None
    out = model.backend.head_loop(model.head_for(step.head_steps), z, x, noise, scale_rows, temperature_rows)
    scatter_tokens(tokens, predict[:bsz], out)


class LazyCache:
    """fast="lazy"'s static buffer of one call (with CFG): the guidance difference z_null - z_cond
    of every position, [B, L, D] float32, written at each full step followed by a lazy one
    (LazyMAR's condition redundancy). Memory: B * L * D * 4 bytes (MAR-B at batch 16: 16 * 256 *
    768 * 4 = 12.6 MB)."""

    def __init__(self, bsz: int, seq_len: int, dim: int, device, encoder=None):
        self.diff = torch.zeros(bsz, seq_len, dim, device=device)
        self.encoder = encoder   # the family's encoder cache (token redundancy), None without one

    @staticmethod
    def wanted(model, plan) -> bool:
        return plan.use_cfg and plan.fast is not None and plan.fast.lazy is not None \
            and any(s.lazy for s in plan.steps)

    @classmethod
    def of(cls, model, plan) -> "LazyCache | None":
        if not cls.wanted(model, plan):
            return None
        new_cache = getattr(model.mar, "new_encoder_cache", None)
        encoder = None if new_cache is None else new_cache(plan.bsz, model.device)
        return cls(plan.bsz, plan.seq_len, model.head.cond_weight.shape[1], model.device, encoder)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def lazy_pass(model, plan, step, tokens, orders, context, lazy: LazyCache) -> torch.Tensor:
    """z [2B, n, D] of a guided step under fast="lazy" (LazyMAR, github:feihongyan1/LazyMAR).

    A lazy step runs the transformer on the conditional half only; the unconditional rows are
    the conditional ones plus the difference cached at the last full step. A full step followed
    by lazy ones runs both halves over its own positions and those the lazy steps will predict
    (`step.cache_after`: a contiguous span of the order) and caches their difference. Static
    shapes: the counts are the plan's."""
    bsz = plan.bsz
    known = torch.sort(orders[:, step.unknown_before:], dim=1).values
    predict = torch.sort(orders[:, step.unknown_after:step.unknown_before], dim=1).values
    cond = tuple(t[:bsz] if t.shape[0] == 2 * bsz else t for t in context)
    if step.lazy:
        if lazy.encoder is not None:   # token redundancy: the encoder on the newly known tokens only
            new = torch.sort(orders[:, step.unknown_before:step.unknown_before + step.new_known], dim=1).values
            z_cond = _autocast_pass(model, tokens, lambda m: m.decode(
                m.encode_cached(tokens, known, new, cond[0], lazy.encoder), known, predict))
        else:
            z_cond = transformer_pass(model, tokens, known, predict, cond)
        return torch.cat([z_cond, z_cond + _rows(lazy.diff, predict)])
    unknown = torch.sort(orders[:, step.cache_after:step.unknown_before], dim=1).values
    if lazy.encoder is not None:   # the conditional half's encoder fills the cache
        null = tuple(t[bsz:] if t.shape[0] == 2 * bsz else t for t in context)
        z = _autocast_pass(model, tokens, lambda m: m.decode(
            torch.cat([m.encode_cached(tokens, known, known, cond[0], lazy.encoder),
                       m.encode(tokens, known, null[0])]), known.repeat(2, 1), unknown.repeat(2, 1)))
    else:
        z = transformer_pass(model, torch.cat([tokens, tokens]), known.repeat(2, 1), unknown.repeat(2, 1), context)
    z_cond, z_null = z.chunk(2)
    dim = z.shape[-1]
    lazy.diff.scatter_(1, unknown.unsqueeze(-1).expand(-1, -1, dim), z_null - z_cond)
    full = torch.zeros(2 * bsz, plan.seq_len, dim, device=z.device, dtype=z.dtype)
    full.scatter_(1, unknown.repeat(2, 1).unsqueeze(-1).expand(-1, -1, dim), z)
    return _rows(full, predict.repeat(2, 1))


def _autocast_pass(model, tokens, fn) -> torch.Tensor:
    """fn(model.mar) under the model's autocast, as transformer_pass runs the family's step."""
    autocast = model.autocast_dtype
    with torch.autocast(tokens.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        z = fn(model.mar)
    return z.float()


def run_steps(count: int, step, progress: bool = False, desc: str = "sampling", unit: str = "step") -> None:
    """The one loop of every family's batch sampler: `step(k)` for k = 0 .. count - 1, each one
    step of the family's plan (a masked step, a decoded position, a refinement), with the
    progress bar. What a step does is the family's; the loop, its order and its bar are here."""
    steps = range(count)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=desc, unit=unit)
    for k in steps:
        step(k)


@torch.no_grad()
def sample(model, bsz: int, condition: Condition, grid: tuple[int, int], num_iter: int = 64,
           cfg=1.0, cfg_schedule="linear", temperature=1.0, progress: bool = False,
           generator=None, fast=None) -> torch.Tensor:
    """Tokens [B, L, C] of any masked family. `cfg`, `cfg_schedule` and `temperature` are shared
    or one per image; `generator` is None (published global RNGs), one torch.Generator, or one
    per image (see engine.rng). `grid` is the token grid (h, w). `fast`: a checked FastMode
    (engine.core.fast) or None (exact)."""
    device, dim = model.device, model.config.token_dim
    seq_len = grid[0] * grid[1]
    plan = build_plan(bsz, num_iter, seq_len, cfg, cfg_schedule, fast, model.head.num_steps)
    temperatures = per_image("temperature", temperature, plan.bsz, validate_temperature)
    generator = check_generator(generator, plan.bsz)
    cfg_images = [c != 1.0 for c in plan.cfgs]

    orders = sample_orders(plan.bsz, seq_len, generator, device)
    context = model.mar.step_context(condition, plan.bsz, plan.use_cfg, grid)
    runner = model.step_runner(plan, grid)

    def step(k: int) -> None:
        x, noise = draw_step_inputs(model.head_for(plan.steps[k].head_steps), plan, plan.steps[k], generator,
                                    device, dim, cfg_images)
        runner.run(k, x, noise)

    with runner.lock:   # a cached graph runner's static buffers serve one call at a time
        runner.start(orders, context, plan.cfg_table(device),
                     torch.tensor(temperatures, dtype=torch.float32, device=device))
        run_steps(len(plan.steps), step, progress)
        tokens = runner.finish()
    check_finite(tokens)
    return tokens


def check_finite(tokens: torch.Tensor) -> None:
    """Non-finite tokens are never returned silently (one host sync, after the last step)."""
    bad = ~torch.isfinite(tokens).flatten(1).all(dim=1)
    if bool(bad.any()):
        images = bad.nonzero().flatten().tolist()
        raise SamplingError(f"sampling produced NaN/Inf tokens in image(s) {images[:8]}: the model "
                            "overflows float32 with these weights and settings (cfg, temperature)")


class EagerRunner:
    """Runs plan steps eagerly (CPU, or CUDA without graphs); one per call, so nothing to lock."""

    lock = contextlib.nullcontext()

    def __init__(self, model, plan, grid):
        self.model, self.plan, self.grid = model, plan, grid

    def start(self, orders, context, cfg_table, temperatures):
        self.orders, self.context = orders, context
        self.cfg_table, self.temperatures = cfg_table, temperatures
        self.lazy = LazyCache.of(self.model, self.plan)
        self.tokens = torch.zeros(self.plan.bsz, self.plan.seq_len, self.model.config.token_dim,
                                  device=orders.device)
        return self.tokens

    def run(self, k, x, noise):
        run_step(self.model, self.plan, self.plan.steps[k], self.tokens, self.orders, self.context,
                 self.cfg_table[k], self.temperatures, x, noise, self.lazy)

    def finish(self):
        tokens, self.tokens = self.tokens, None
        return tokens


# Iteration-level sampling: images in flight, each at its own step -------------------------------
# engine.serving's scheduler admits images and retires finished ones between steps; `advance`
# runs one step for any set of images, whatever their plans: images at the same step shape share
# one transformer pass, and all their predicted rows go through one head call with per-row cfg
# scales and temperatures. Each image draws its order and noise from its own generator exactly as
# `sample` draws them for a batch of one, so its tokens equal that call's (up to float rounding).

class InFlightImage:
    """One image being sampled: its plan (a batch of one, its own cfg / schedule / num_iter),
    generator, order, tokens [1, L, C], step context rows and step index `k`."""

    def __init__(self, model, condition: Condition, grid, num_iter: int, cfg, cfg_schedule,
                 temperature, generator: torch.Generator, fast=None):
        check_image_generator(generator)
        device = model.device
        self.grid = tuple(grid)
        seq_len = self.grid[0] * self.grid[1]
        if fast is not None and fast.lazy is not None:
            raise SettingError("fast", "'lazy' keeps per-call caches and cannot run in a shared batch "
                                       "(serving); use 'disa' or 'exact' there")
        self.plan = build_plan(1, num_iter, seq_len, cfg, cfg_schedule, fast, model.head.num_steps)
        self.temperature = validate_temperature(temperature)
        self.generator = generator
        self.use_cfg = self.plan.use_cfg
        # The same draw as `sample` makes first for a batch of one with a list of one generator.
        self.orders = sample_orders(1, seq_len, [generator], device)
        # Context rows of the condition and of the family's null condition (computed once):
        # a batch of one with CFG gives [cond; null] rows; tensors of one row are shared tables
        # (e.g. Fluid's position embeddings for the grid), equal for every image of the grid.
        context = model.mar.step_context(condition, 1, True, self.grid)
        self.context = tuple((t[:1], t[1:2]) if t.shape[0] == 2 else (t, None) for t in context)
        self.tokens = torch.zeros(1, seq_len, model.config.token_dim, device=device)
        self.k = 0

    @property
    def done(self) -> bool:
        return self.k >= len(self.plan.steps)

    @property
    def num_steps(self) -> int:
        return len(self.plan.steps)

    @property
    def step(self) -> PlanStep:
        return self.plan.steps[self.k]

    @property
    def shape_key(self) -> tuple:
        """Images with equal keys share a transformer pass: grid, known and predicted counts."""
        step = self.step
        return (self.grid, step.unknown_before, step.unknown_after)

    @property
    def cfg_scale(self) -> float:
        return self.step.cfg_scales[0]

    @property
    def predicting(self) -> int:
        """Tokens the next step predicts (the head rows it adds)."""
        return self.step.num_predict


def _group_context(members, cfg_members):
    """The step context of a group: condition rows of every member, then null rows of the
    members with CFG (the row order of `sample`'s [cond; null] batch)."""
    out = []
    for j, (first, null) in enumerate(members[0].context):
        if null is None:
            out.append(first)
        else:
            out.append(torch.cat([m.context[j][0] for m in members]
                                 + [m.context[j][1] for m in cfg_members]))
    return tuple(out)


@torch.no_grad()
def advance(model, images: list) -> list:
    """One step of every image in `images` (InFlightImage, none done); returns those finished.

    Groups images by step shape for the transformer, then runs ONE head loop over all predicted
    rows: with any image using CFG the call is guided, each image's rows at its own scale (1 for
    an image without CFG, whose unconditional rows repeat its conditional ones, so its guided
    eps equals its conditional eps); temperatures per row. Noise is drawn per image as a batch
    of one draws it (null-half noise only for images with CFG). Nothing changes before the
    head's output is scattered at the end: a step that raises leaves every image as it was
    (only the generators have drawn)."""
    if not images:
        return []
    groups: dict = {}
    for image in images:
        groups.setdefault(image.shape_key, []).append(image)
    z_cond, z_null, predicts = {}, {}, {}
    for (_, before, after), members in groups.items():
        orders = torch.cat([m.orders for m in members])
        known = torch.sort(orders[:, before:], dim=1).values          # as SamplingPlan.indices
        predict = torch.sort(orders[:, after:before], dim=1).values
        cfg_index = [i for i, m in enumerate(members) if m.use_cfg]
        cfg_members = [members[i] for i in cfg_index]
        tokens_in = torch.cat([m.tokens for m in members] + [m.tokens for m in cfg_members])
        if cfg_index:
            sel = torch.tensor(cfg_index, device=known.device)
            known_in, predict_in = torch.cat([known, known[sel]]), torch.cat([predict, predict[sel]])
        else:
            known_in, predict_in = known, predict
        z = transformer_pass(model, tokens_in, known_in, predict_in, _group_context(members, cfg_members))
        for i, m in enumerate(members):
            z_cond[id(m)], predicts[id(m)] = z[i], predict[i:i + 1]
        for j, m in enumerate(cfg_members):
            z_null[id(m)] = z[len(members) + j]
    outs = {}
    by_head: dict = {}   # fast "disa": images whose step runs a head of the same length share a call
    for image in images:
        by_head.setdefault(image.step.head_steps, []).append(image)
    for head_steps, members in by_head.items():
        outs.update(_head_call(model, model.head_for(head_steps), members, z_cond, z_null))
    finished = []
    for image in images:
        scatter_tokens(image.tokens, predicts[id(image)], outs[id(image)])
        image.k += 1
        if image.done:
            finished.append(image)
    return finished


def _head_call(model, head, images, z_cond, z_null) -> dict:
    """One head loop over the predicted rows of `images`: {id(image): its tokens [n, C]}."""
    device, dim = model.device, model.config.token_dim
    guided = any(image.use_cfg for image in images)
    xs, conds, nulls, zc, zn, scales, temps = [], [], [], [], [], [], []
    for image in images:
        n = image.step.num_predict
        x, noise = _draw_one(head.num_steps, n, dim, image.use_cfg, image.generator, device)
        xs.append(x)
        conds.append(noise[:, :n])
        zc.append(z_cond[id(image)])
        if guided:
            nulls.append(noise[:, n:] if image.use_cfg else torch.zeros_like(noise))
            zn.append(z_null[id(image)] if image.use_cfg else z_cond[id(image)])
            scales += [image.cfg_scale] * n
        temps += [image.temperature] * n
    z_rows = torch.cat(zc + zn)
    noise = torch.cat(conds + nulls, dim=1)
    scale_rows = torch.tensor(scales, dtype=torch.float32, device=device) if guided else None
    temperature_rows = torch.tensor(temps, dtype=torch.float32, device=device)
    out = model.backend.head_loop(head, z_rows, torch.cat(xs), noise, scale_rows, temperature_rows)
    start, outs = 0, {}
    for image in images:
        n = image.step.num_predict
        outs[id(image)] = out[start:start + n]
        start += n
    return outs
