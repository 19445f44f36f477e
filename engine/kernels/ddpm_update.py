"""One reverse DDPM step for all rows in one kernel, fp32, in the published operation order:
CFG combination of eps, x0 (optionally clipped), posterior mean, learned-range log-variance,
temperature-scaled noise. `out` is the head output [R, 2C] (eps | v); with CFG R = 2n and rows
[cond; uncond]: eps = eps_u + s[r] * (eps_c - eps_u), v from the cond half, noise rows [:n].
`coeffs` is one row of PackedHead.table: (sqrt_recip, sqrt_recipm1, coef1, coef2, min_log,
max_log, nonzero). The CFG scale s and the temperature are float32 [n], one per result row,
loaded per row by the kernels (the launchers and references also take numbers).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from engine.ops.head import row_param

from .utils import check_rows, interpret, launch, pow2


def row_args(cfg_scale, temperature, n, device):
    """(cfg [n] or None, temperature [n]) float32 on `device` from numbers or [n] tensors."""
    return (row_param(cfg_scale, "cfg_scale", n, device, optional=True, as_tensor=True),
            row_param(temperature, "temperature", n, device, as_tensor=True))


@triton.jit
def cfg_eps(eps_c, eps_u, cfg_scale):
    return eps_u + cfg_scale * (eps_c - eps_u)


@triton.jit
def ddpm_step(x, eps, v, coeff_ptr, noise, temperature, clip_lo, clip_hi, HAS_CLIP: tl.constexpr):
    """Elementwise update; the same expression tree as engine.ops.head.ddpm_update (the
    kernels are compiled without FMA contraction so each product/sum rounds as in torch).
    `temperature` is a [BM, 1] column of per-row values."""
    sqrt_recip = tl.load(coeff_ptr + 0)
    sqrt_recipm1 = tl.load(coeff_ptr + 1)
    coef1 = tl.load(coeff_ptr + 2)
    coef2 = tl.load(coeff_ptr + 3)
    min_log = tl.load(coeff_ptr + 4)
    max_log = tl.load(coeff_ptr + 5)
    nonzero = tl.load(coeff_ptr + 6)
    x0 = sqrt_recip * x - sqrt_recipm1 * eps
    if HAS_CLIP:
        x0 = tl.minimum(tl.maximum(x0, clip_lo), clip_hi)
    mean = coef1 * x0 + coef2 * x
    frac = (v + 1.0) * 0.5  # == (v + 1) / 2 exactly
    logvar = frac * max_log + (1.0 - frac) * min_log
    return mean + nonzero * tl.exp(0.5 * logvar) * noise * temperature


@triton.jit
def _ddpm_kernel(x_ptr, out_ptr, noise_ptr, coeff_ptr, cfg_ptr, temp_ptr, new_ptr, n, C,
                 stride_x, stride_out, stride_noise, stride_new, clip_lo, clip_hi,
                 HAS_CFG: tl.constexpr, HAS_CLIP: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BC)
    rmask = rows < n
    m = rmask[:, None] & (cols < C)[None, :]
    r2, c2 = rows[:, None], cols[None, :]
    x = tl.load(x_ptr + r2 * stride_x + c2, mask=m, other=0.0)
    eps = tl.load(out_ptr + r2 * stride_out + c2, mask=m, other=0.0)
    v = tl.load(out_ptr + r2 * stride_out + C + c2, mask=m, other=0.0)
    if HAS_CFG:
        eps_u = tl.load(out_ptr + (r2 + n) * stride_out + c2, mask=m, other=0.0)
        cfg = tl.load(cfg_ptr + rows, mask=rmask, other=0.0)[:, None]
        eps = cfg_eps(eps, eps_u, cfg)
    noise = tl.load(noise_ptr + r2 * stride_noise + c2, mask=m, other=0.0)
    temp = tl.load(temp_ptr + rows, mask=rmask, other=0.0)[:, None]
    new = ddpm_step(x, eps, v, coeff_ptr, noise, temp, clip_lo, clip_hi, HAS_CLIP)
    tl.store(new_ptr + r2 * stride_new + c2, new, mask=m)


def ddpm_config(n: int, C: int) -> dict:
    if interpret():
        return dict(BM=pow2(n, lo=2, hi=64), BC=pow2(C, lo=2), num_warps=4)
    return dict(BM=pow2(n, lo=2, hi=32), BC=pow2(C, lo=2), num_warps=4)


def launch_ddpm(x, out, noise, coeffs, cfg_scale, temperature, clip_lo, clip_hi, config=None):
    """cfg_scale / temperature: numbers or float32 [n] tensors (one per result row)."""
    for t, name in ((x, "x"), (out, "out"), (noise, "noise")):
        check_rows(t, name)
    n, C = x.shape
    cfg_scale, temperature = row_args(cfg_scale, temperature, n, x.device)
    rows = 2 * n if cfg_scale is not None else n
    if out.shape != (rows, 2 * C) or noise.shape[0] < n or noise.shape[1] != C:
        raise ValueError(f"expected out [{rows}, {2 * C}] and noise [>= {n}, {C}], got "
                         f"{tuple(out.shape)} and {tuple(noise.shape)}")
    if coeffs.shape != (7,) or coeffs.dtype != torch.float32 or (clip_lo is None) != (clip_hi is None):
        raise ValueError("coeffs must be one float32 table row [7]; clip needs both bounds or none")
    new = torch.empty(n, C, device=x.device, dtype=torch.float32)
    if n == 0:
        return new
    cfg = dict(config or ddpm_config(n, C))
    num_warps = cfg.pop("num_warps", 4)
    # No FMA contraction: every product and sum rounds as in the torch reference. Without CFG
    # cfg_ptr is never read (temperature stands in: any fp32 pointer).
    launch("ddpm_update", _ddpm_kernel, (triton.cdiv(n, cfg["BM"]),),
           x, out, noise, coeffs.contiguous(), temperature if cfg_scale is None else cfg_scale,
           temperature, new, n, C, x.stride(0), out.stride(0), noise.stride(0), new.stride(0),
           0.0 if clip_lo is None else float(clip_lo),
           0.0 if clip_hi is None else float(clip_hi),
           HAS_CFG=cfg_scale is not None, HAS_CLIP=clip_lo is not None,
           num_warps=num_warps, enable_fp_fusion=False, **cfg)
    return new


@torch.library.custom_op("engine::ddpm_update", mutates_args=())
def ddpm_update(x: torch.Tensor, out: torch.Tensor, noise: torch.Tensor, coeffs: torch.Tensor,
                cfg_scale: Optional[torch.Tensor], temperature: torch.Tensor,
                clip_lo: Optional[float] = None, clip_hi: Optional[float] = None) -> torch.Tensor:
    """x [n, C] after one reverse step from head output `out`; cfg_scale (None: no CFG) and
    temperature are float32 [n]; see the module docstring."""
    return launch_ddpm(x, out, noise, coeffs, cfg_scale, temperature, clip_lo, clip_hi)


@ddpm_update.register_fake
def _(x, out, noise, coeffs, cfg_scale, temperature, clip_lo=None, clip_hi=None):
    return x.new_empty(x.shape, dtype=torch.float32)


def ddpm_update_ref(x, out, noise, coeffs, cfg_scale, temperature, clip_lo=None, clip_hi=None):
    """Plain torch: the CFG combination of engine.ops.head.DiffusionHead.forward_with_cfg,
    then engine.ops.head.ddpm_update."""
    from engine.ops.head import ddpm_update as head_ddpm_update

    n, C = x.shape
    cfg_scale, temperature = row_args(cfg_scale, temperature, n, x.device)
    cfg_scale = None if cfg_scale is None else cfg_scale[:, None]   # per-row columns
    temperature = temperature[:, None]
    eps, v = out[:n, :C], out[:n, C:]
    if cfg_scale is not None:
        eps_u = out[n:, :C]
        eps = eps_u + cfg_scale * (eps - eps_u)
    clip = None if clip_lo is None else (clip_lo, clip_hi)
    return head_ddpm_update(x, eps, v, coeffs, noise[:n], temperature, clip)
