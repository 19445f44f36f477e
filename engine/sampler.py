"""The masked-autoregressive loop: plan step -> transformer pass -> head loop -> scatter.

This is the only place the sampling math is written; backends only run the head loop."""
from __future__ import annotations

import math

import numpy as np
import torch

from .errors import SamplingError
from .models.mar import unpatchify
from .plan import build_plan


def validate_labels(labels, bsz: int, class_num: int, device) -> torch.Tensor | None:
    if labels is None:
        return None
    if isinstance(labels, torch.Tensor):
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise SamplingError(f"labels must be integers, got a {labels.dtype} tensor")
        values = labels.detach().to("cpu", torch.int64).reshape(-1)
        shape = tuple(labels.shape)
    else:
        arr = np.asarray(labels)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer)):
            raise SamplingError(f"labels must be integers, got {labels!r}")
        values = torch.from_numpy(arr.astype(np.int64)).reshape(-1)
        shape = arr.shape
    if len(shape) != 1 or shape[0] != bsz:
        raise SamplingError(f"expected {bsz} labels (one per image), got shape {shape}")
    bad = values[(values < 0) | (values >= class_num)]
    if bad.numel():
        raise SamplingError(f"label {int(bad[0])} is out of range: this model has {class_num} "
                            f"classes (0..{class_num - 1})")
    return values.to(device)


def validate_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise SamplingError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


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
    rand = torch.rand(bsz, seq_len, generator=generator, device=generator.device)
    return torch.argsort(rand, dim=1).to(device)


def randn(shape, generator, device) -> torch.Tensor:
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def draw_step_noise(num_steps: int, rows: int, channels: int, generator, device) -> torch.Tensor:
    """The noise of one head loop, [T, rows, C], equal to T successive randn(rows, C) draws.

    On CPU one draw of the whole block gives the same numbers whenever rows*C is a multiple of 16
    (torch fills normals in blocks of 16); otherwise draw step by step."""
    gen_device = generator.device if generator is not None else torch.device(device)
    if gen_device.type == "cpu" and (rows * channels) % 16 == 0:
        return randn((num_steps, rows, channels), generator, device)
    return torch.stack([randn((rows, channels), generator, device) for _ in range(num_steps)])


@torch.no_grad()
def sample_tokens(model, bsz: int, num_iter: int = 64, cfg: float = 1.0, cfg_schedule: str = "linear",
                  labels=None, temperature: float = 1.0, progress: bool = False, generator=None):
    """Published-compatible sampling; see `MARModel.sample_tokens`."""
    mar, head, backend, config = model.mar, model.head, model.backend, model.config
    device = model.device
    plan = build_plan(bsz, num_iter, config.seq_len, cfg, cfg_schedule)
    labels = validate_labels(labels, bsz, config.class_num, device)
    temperature = validate_temperature(temperature)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise SamplingError(f"generator must be a torch.Generator, got {type(generator).__name__}")

    dim = config.token_dim
    tokens = torch.zeros(bsz, config.seq_len, dim, device=device)
    orders = sample_orders(bsz, config.seq_len, generator, device)
    class_emb = mar.class_embedding(labels, bsz, plan.use_cfg)
    steps = plan.steps
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="sampling", unit="step")
    for step in steps:
        known, predict = plan.indices(step, orders)
        tokens_in = torch.cat([tokens, tokens]) if plan.use_cfg else tokens
        z = mar.forward_step(tokens_in, known, predict, class_emb)
        z = z.reshape(-1, z.shape[-1])
        n = bsz * step.num_predict
        # Published draw order: start noise, then one draw per diffusion step (all rows).
        x = randn((n, dim), generator, None if generator is None else device)
        x = x.to(device)
        noise = draw_step_noise(head.num_steps, z.shape[0], dim, generator, device)
        x = backend.head_loop(head, z, x, noise, step.cfg_scale if plan.use_cfg else None, temperature)
        index = predict[:bsz].unsqueeze(-1).expand(-1, -1, dim)
        tokens.scatter_(1, index, x.reshape(bsz, step.num_predict, dim).to(tokens.dtype))
    return unpatchify(tokens, config.patch_size, config.vae_embed_dim, config.seq_h)
