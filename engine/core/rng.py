"""Where a sampling call's random numbers come from, in the published order.

Three modes:
  * no generator: numpy's global RNG for the orders (one shuffle per image) and torch's global
    RNG for the noise, exactly as the published samplers draw them;
  * one `torch.Generator`: it alone drives the whole batch (orders, then each step's noise);
  * a list of generators, one per image (the diffusers convention): image i's order and noise
    come from generator i alone, drawn as a batch of one would draw them, so an image does not
    depend on its batch-mates, the batch size or the batch order.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import SamplingError


def check_generator(generator, bsz: int):
    """None, one generator, or a list of `bsz` generators (a list of one is the same as one
    generator for a batch of one)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (list, tuple)):
        if len(generator) != bsz:
            raise SamplingError(f"got {len(generator)} generators for {bsz} images; pass one "
                                "torch.Generator, or a list with one per image")
        bad = [type(g).__name__ for g in generator if not isinstance(g, torch.Generator)]
        if bad:
            raise SamplingError(f"generator list entries must be torch.Generator, got {bad[0]}")
        return list(generator)
    raise SamplingError(f"generator must be a torch.Generator or a list of them, got "
                        f"{type(generator).__name__}")


def randn(shape, generator, device) -> torch.Tensor:
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def sample_orders(bsz: int, seq_len: int, generator, device) -> torch.Tensor:
    """Random generation orders [B, L]. Without a generator: numpy's global RNG, one shuffle
    per image, as published; with one: a device-side argsort of uniform draws."""
    if generator is None:
        orders = []
        for _ in range(bsz):
            order = np.arange(seq_len)
            np.random.shuffle(order)
            orders.append(order)
        return torch.from_numpy(np.stack(orders)).to(device)
    if isinstance(generator, list):
        return torch.cat([sample_orders(1, seq_len, g, device) for g in generator])
    rand = torch.rand(bsz, seq_len, generator=generator, device=generator.device)
    return torch.argsort(rand, dim=1).to(device)


def draw_step_noise(num_steps: int, rows: int, channels: int, generator, device) -> torch.Tensor:
    """The noise of one head loop, [T, rows, C], equal to T successive randn(rows, C) draws.

    On CPU one draw of the whole block gives the same numbers whenever rows*C is a multiple of 16
    (torch fills normals in blocks of 16); otherwise draw step by step."""
    gen_device = generator.device if generator is not None else torch.device(device)
    if gen_device.type == "cpu" and (rows * channels) % 16 == 0:
        return randn((num_steps, rows, channels), generator, device)
    return torch.stack([randn((rows, channels), generator, device) for _ in range(num_steps)])


def _draw_one(num_steps, n, dim, doubled, generator, device):
    """Start noise [n, C] and step noise [T, R, C] of one head loop (R = 2n when `doubled`),
    in the published order: start noise first, then one draw per diffusion step for all rows.
    Without a generator the start noise comes from the CPU generator (published: torch.randn(...)
    .cuda()) and the step noise from the device's (published: randn_like on the device)."""
    x = randn((n, dim), generator, None if generator is None else device).to(device)
    noise = draw_step_noise(num_steps, 2 * n if doubled else n, dim, generator, device)
    return x, noise


def draw_step_inputs(head, plan, step, generator, device, dim, cfg_images=None):
    """(x [B*n, C], noise [T, B'*n, C]) of one plan step. Rows are image-major, and with CFG the
    null half follows the conditional one. With a generator list each image draws as a batch
    of one with its own setting (`cfg_images[i]`: whether image i uses CFG); the null-half noise
    of an image without CFG is never read (backends return the conditional rows) and is zero."""
    n, num_steps = step.num_predict, head.num_steps
    if not isinstance(generator, list):
        return _draw_one(num_steps, plan.bsz * n, dim, plan.use_cfg, generator, device)
    cfg_images = cfg_images or [plan.use_cfg] * plan.bsz
    xs, conds, nulls = [], [], []
    for g, doubled in zip(generator, cfg_images):
        x, noise = _draw_one(num_steps, n, dim, doubled, g, device)
        xs.append(x)
        conds.append(noise[:, :n])
        nulls.append(noise[:, n:] if doubled else torch.zeros_like(noise))
    noise = torch.cat(conds + nulls if plan.use_cfg else conds, dim=1)
    return torch.cat(xs), noise
