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


def draw_step_inputs(head, plan, step, generator, device, dim):
    """Start noise [n, C] and per-diffusion-step noise [T, R, C] of one plan step, drawn in the
    published order: start noise first, then one draw per diffusion step for all R rows.
    Without a generator the start noise comes from the CPU generator (published: torch.randn(...)
    .cuda()) and the step noise from the device's (published: randn_like on the device)."""
    n = plan.bsz * step.num_predict
    rows = 2 * n if plan.use_cfg else n
    x = randn((n, dim), generator, None if generator is None else device).to(device)
    noise = draw_step_noise(head.num_steps, rows, dim, generator, device)
    return x, noise


def run_step(model, plan, step, tokens, orders, class_emb, x, noise, temperature) -> None:
    """One plan step, in place on `tokens [B, L, C]`: gather known and predicted positions,
    transformer pass, the backend's head loop, scatter. Static shapes, no host synchronisation:
    this is what torch.compile(fullgraph=True) traces and what a CUDA graph captures."""
    bsz, dim = plan.bsz, tokens.shape[-1]
    known, predict = plan.indices(step, orders)
    tokens_in = torch.cat([tokens, tokens]) if plan.use_cfg else tokens
    autocast = model.autocast_dtype
    with torch.autocast(tokens.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        z = model.mar.forward_step(tokens_in, known, predict, class_emb)
    z = z.reshape(-1, z.shape[-1]).float()
    scale = step.cfg_scale if plan.use_cfg else None
    out = model.backend.head_loop(model.head, z, x, noise, scale, temperature)
    index = predict[:bsz].unsqueeze(-1).expand(-1, -1, dim)
    tokens.scatter_(1, index, out.reshape(bsz, step.num_predict, dim).to(tokens.dtype))


@torch.no_grad()
def sample_tokens(model, bsz: int, num_iter: int = 64, cfg: float = 1.0, cfg_schedule: str = "linear",
                  labels=None, temperature: float = 1.0, progress: bool = False, generator=None):
    """Published-compatible sampling; see `MARModel.sample_tokens`."""
    config, device = model.config, model.device
    plan = build_plan(bsz, num_iter, config.seq_len, cfg, cfg_schedule)
    labels = validate_labels(labels, bsz, config.class_num, device)
    temperature = validate_temperature(temperature)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise SamplingError(f"generator must be a torch.Generator, got {type(generator).__name__}")

    dim = config.token_dim
    orders = sample_orders(bsz, config.seq_len, generator, device)
    class_emb = model.mar.class_embedding(labels, bsz, plan.use_cfg)
    runner = model.step_runner(plan, temperature)
    tokens = runner.start(orders, class_emb)
    steps = list(enumerate(plan.steps))
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="sampling", unit="step")
    for k, step in steps:
        x, noise = draw_step_inputs(model.head, plan, step, generator, device, dim)
        runner.run(k, x, noise)
    tokens = runner.finish()
    return unpatchify(tokens, config.patch_size, config.vae_embed_dim, config.seq_h)


class EagerRunner:
    """Runs plan steps eagerly (CPU, or CUDA without graphs)."""

    def __init__(self, model, plan, temperature):
        self.model, self.plan, self.temperature = model, plan, temperature

    def start(self, orders, class_emb):
        config = self.model.config
        self.orders, self.class_emb = orders, class_emb
        self.tokens = torch.zeros(self.plan.bsz, config.seq_len, config.token_dim, device=orders.device)
        return self.tokens

    def run(self, k, x, noise):
        run_step(self.model, self.plan, self.plan.steps[k], self.tokens, self.orders, self.class_emb,
                 x, noise, self.temperature)

    def finish(self):
        tokens, self.tokens = self.tokens, None
        return tokens
