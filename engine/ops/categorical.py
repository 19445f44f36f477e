"""Categorical sampling on the device, as one graph-safe step: CFG on logits, temperature, top-k /
top-p, softmax and the draw, with no host synchronisation (torch.compile(fullgraph=True) traces
it; a CUDA graph can capture it).

The draw is `torch.multinomial(probs, 1)` re-stated: for one sample torch computes
`argmax(probs / q)` with `q = empty_like(probs).exponential_(1)` (the exponential race; see
ATen's multinomial), after host-side validity checks. Drawing `q` ourselves, in the same shape
and order, gives the same indices from the same RNG state without those checks' host syncs, so
the published `torch.multinomial` calls are reproduced exactly after torch.manual_seed(s).
"""
from __future__ import annotations

import numbers

import torch

from ..core.errors import SamplingError


def exponential_noise(bsz: int, n_draws: int, vocab: int, generator, device) -> torch.Tensor:
    """q [bsz, n_draws, vocab] ~ Exp(1): draw i is what the i-th `torch.multinomial(p_i, 1)` of a
    [bsz, vocab] p_i would draw. generator None: the device's global RNG (as the published
    multinomial); one torch.Generator: it alone; a list: image b's rows from generator b alone,
    drawn as a batch of one would draw them."""
    if isinstance(generator, list):
        return torch.cat([exponential_noise(1, n_draws, vocab, g, device) for g in generator])
    if generator is None:
        draws = [torch.empty(bsz, vocab, device=device).exponential_(1) for _ in range(n_draws)]
    else:
        draws = [torch.empty(bsz, vocab, device=generator.device).exponential_(1, generator=generator)
                 for _ in range(n_draws)]
    return torch.stack(draws, dim=1).to(device)


def guide(logits: torch.Tensor, scale) -> torch.Tensor:
    """CFG on logits of a doubled batch [cond; null] (`scale` a number, a 0-d tensor, or one per
    image [B]): published `u + (c - u) * s`, operation for operation."""
    cond, uncond = torch.split(logits, logits.shape[0] // 2, dim=0)
    if isinstance(scale, torch.Tensor) and scale.ndim == 1:
        scale = scale.view(-1, *([1] * (logits.ndim - 1)))
    return uncond + (cond - uncond) * scale


def divide_by_temperature(logits: torch.Tensor, temperature) -> torch.Tensor:
    """`logits / temperature` with the rounding the published `tensor / python_float` has on this
    device: a true division on CPU; CUDA multiplies by the float32 reciprocal of a CPU scalar."""
    if not isinstance(temperature, torch.Tensor):
        return logits / temperature
    t = temperature.view(-1, *([1] * (logits.ndim - 1))) if temperature.ndim == 1 else temperature
    if logits.device.type == "cuda":
        return logits * torch.reciprocal(t)
    return logits / t


def top_k_mask(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Published top-k: every logit below the k-th largest becomes -inf (ties at the k-th value
    are kept). `masked_fill` instead of the published boolean-index assignment (a host sync)."""
    k = min(int(top_k), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering (engine addition; ELM has none): keep the smallest set of the most
    likely tokens whose probability reaches `top_p` (at least the most likely one). Tokens tied
    in value are taken in index order (a stable sort: the unstable one orders ties by
    implementation, so which tied token a boundary keeps would depend on the device)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs       # mass of the more likely tokens
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_logits(logits: torch.Tensor, noise: torch.Tensor, scale=None, temperature=1.0,
                  top_k: int | None = None, top_p: float | None = None):
    """(indices [B, T], filtered logits [B, T, V]) from logits [B', T, V] (B' = 2B with CFG,
    `scale` given) and exponential noise [B, T, V]. Published order: CFG, temperature, top-k,
    softmax, draw; top-p (an engine addition) after top-k."""
    if scale is not None:
        logits = guide(logits, scale)
    logits = divide_by_temperature(logits, temperature)
    if top_k is not None:
        logits = top_k_mask(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_mask(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.argmax(probs / noise, dim=-1), logits, probs


def check_top_k(top_k, name: str = "top_k"):
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise SamplingError(f"{name} must be a positive integer or None, got {top_k!r:.80}")
    if top_k < 1:
        raise SamplingError(f"{name} must be at least 1 (or None for no top-k), got {top_k}")
    return int(top_k)


def check_top_p(top_p, name: str = "top_p"):
    if top_p is None:
        return None
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise SamplingError(f"{name} must be a number in (0, 1] or None, got {top_p!r:.80}")
    return float(top_p)
