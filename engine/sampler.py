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
from .plan import FLOAT32_MAX, build_plan, per_image
from .rng import check_generator, draw_step_inputs, draw_step_noise, randn, sample_orders  # noqa: F401


def validate_labels(labels, bsz: int, class_num: int, device) -> torch.Tensor | None:
    """Class labels as an int64 tensor on `device` (None stays None); see Condition.labels."""
    return Condition.labels(labels, bsz, class_num, device).value


def validate_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating, np.integer)) \
            or not math.isfinite(temperature) or temperature <= 0 or temperature > FLOAT32_MAX:
        raise SamplingError(f"temperature must be a finite number > 0 (within float32 range), got {temperature!r}")
    return float(temperature)


def run_step(model, plan, step, tokens, orders, context, cfg_scales, temperatures, x, noise) -> None:
    """One plan step, in place on `tokens [B, L, C]`: gather known and predicted positions,
    transformer pass, the backend's head loop, scatter. `cfg_scales` and `temperatures` are [B]
    (per image; expanded to the image's predicted rows). Static shapes, no host synchronisation:
    this is what torch.compile(fullgraph=True) traces and what a CUDA graph captures."""
    bsz, dim, n = plan.bsz, tokens.shape[-1], step.num_predict
    known, predict = plan.indices(step, orders)
    tokens_in = torch.cat([tokens, tokens]) if plan.use_cfg else tokens
    autocast = model.autocast_dtype
    with torch.autocast(tokens.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        z = model.mar.forward_step(tokens_in, known, predict, context)
    z = z.reshape(-1, z.shape[-1]).float()
    temperature_rows = temperatures[:, None].expand(bsz, n).reshape(-1)
    scale_rows = cfg_scales[:, None].expand(bsz, n).reshape(-1) if plan.use_cfg else None
    out = model.backend.head_loop(model.head, z, x, noise, scale_rows, temperature_rows)
    index = predict[:bsz].unsqueeze(-1).expand(-1, -1, dim)
    tokens.scatter_(1, index, out.reshape(bsz, n, dim).to(tokens.dtype))


@torch.no_grad()
def sample(model, bsz: int, condition: Condition, grid: tuple[int, int], num_iter: int = 64,
           cfg=1.0, cfg_schedule="linear", temperature=1.0, progress: bool = False,
           generator=None) -> torch.Tensor:
    """Tokens [B, L, C] of any masked family. `cfg`, `cfg_schedule` and `temperature` are shared
    or one per image; `generator` is None (published global RNGs), one torch.Generator, or one
    per image (see engine.rng). `grid` is the token grid (h, w)."""
    device, dim = model.device, model.config.token_dim
    seq_len = grid[0] * grid[1]
    plan = build_plan(bsz, num_iter, seq_len, cfg, cfg_schedule)
    temperatures = per_image("temperature", temperature, plan.bsz, validate_temperature)
    generator = check_generator(generator, plan.bsz)
    cfg_images = [c != 1.0 for c in plan.cfgs]

    orders = sample_orders(plan.bsz, seq_len, generator, device)
    context = model.mar.step_context(condition, plan.bsz, plan.use_cfg, grid)
    runner = model.step_runner(plan, grid)
    steps = list(enumerate(plan.steps))
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="sampling", unit="step")
    with runner.lock:   # a cached graph runner's static buffers serve one call at a time
        runner.start(orders, context, plan.cfg_table(device),
                     torch.tensor(temperatures, dtype=torch.float32, device=device))
        for k, step in steps:
            x, noise = draw_step_inputs(model.head, plan, step, generator, device, dim, cfg_images)
            runner.run(k, x, noise)
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
        self.tokens = torch.zeros(self.plan.bsz, self.plan.seq_len, self.model.config.token_dim,
                                  device=orders.device)
        return self.tokens

    def run(self, k, x, noise):
        run_step(self.model, self.plan, self.plan.steps[k], self.tokens, self.orders, self.context,
                 self.cfg_table[k], self.temperatures, x, noise)

    def finish(self):
        tokens, self.tokens = self.tokens, None
        return tokens
