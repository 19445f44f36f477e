"""LayerNorm fused with MAR's per-row modulation: LN(h) * (1 + scale) + shift.

shift/scale are [M, N] row-strided views (usually column slices of the adaLN GEMM output), so
every row has its own modulation. LN is optionally affine (ResBlock.in_ln) or not (norm_final).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .utils import check_rows, interpret, launch, pow2, row_moments


@triton.jit
def modln_tile(x, mean, rstd, lnw, lnb, shift, scale, AFFINE: tl.constexpr):
    """One [BM, BK] tile of LN(x) * (1 + scale) + shift, in torch's operation order."""
    y = (x - mean[:, None]) * rstd[:, None]
    if AFFINE:
        y = y * lnw[None, :] + lnb[None, :]
    return y * (1.0 + scale) + shift


@triton.jit
def _modln_kernel(h_ptr, shift_ptr, scale_ptr, lnw_ptr, lnb_ptr, out_ptr,
                  M, N, stride_h, stride_shift, stride_scale, stride_out, eps,
                  AFFINE: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    mean, rstd = row_moments(h_ptr, rows, stride_h, rmask, N, eps, BM, BK)
    cols = tl.arange(0, BK)
    for k0 in range(0, N, BK):
        c = k0 + cols
        cmask = c < N
        m = rmask[:, None] & cmask[None, :]
        x = tl.load(h_ptr + rows[:, None] * stride_h + c[None, :], mask=m, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + rows[:, None] * stride_shift + c[None, :], mask=m, other=0.0)
        scale = tl.load(scale_ptr + rows[:, None] * stride_scale + c[None, :], mask=m, other=0.0)
        lnw = tl.load(lnw_ptr + c, mask=cmask, other=0.0).to(tl.float32) if AFFINE else None
        lnb = tl.load(lnb_ptr + c, mask=cmask, other=0.0).to(tl.float32) if AFFINE else None
        y = modln_tile(x, mean, rstd, lnw, lnb, shift.to(tl.float32), scale.to(tl.float32), AFFINE)
        tl.store(out_ptr + rows[:, None] * stride_out + c[None, :], y, mask=m)


def modln_config(M: int, N: int) -> dict:
    if interpret():  # one program for all test rows; fewer interpreted programs is faster
        return dict(BM=pow2(M, lo=2, hi=64), BK=pow2(N, hi=2048), num_warps=4)
    return dict(BM=2, BK=pow2(N, hi=1024), num_warps=4)


def launch_modln(h, shift, scale, weight, bias, eps, config=None):
    for t, name in ((h, "h"), (shift, "shift"), (scale, "scale")):
        check_rows(t, name)
    M, N = h.shape
    if shift.shape != (M, N) or scale.shape != (M, N):
        raise ValueError(f"shift/scale must be {(M, N)}, got {tuple(shift.shape)}, {tuple(scale.shape)}")
    if (weight is None) != (bias is None):
        raise ValueError("pass both LayerNorm weight and bias, or neither")
    out = torch.empty(M, N, device=h.device, dtype=torch.float32)
    if M == 0:
        return out
    cfg = dict(config or modln_config(M, N))
    num_warps = cfg.pop("num_warps", 4)
    affine = weight is not None
    dummy = h  # never read when AFFINE is False
    launch("modulated_layernorm", _modln_kernel, (triton.cdiv(M, cfg["BM"]),),
           h, shift, scale, weight.contiguous() if affine else dummy,
           bias.contiguous() if affine else dummy, out, M, N,
           h.stride(0), shift.stride(0), scale.stride(0), out.stride(0), eps,
           AFFINE=affine, num_warps=num_warps, enable_fp_fusion=False, **cfg)
    return out


@torch.library.custom_op("engine::modulated_layernorm", mutates_args=())
def modulated_layernorm(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                        weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                        eps: float = 1e-6) -> torch.Tensor:
    """LN(h) * (1 + scale) + shift with per-row shift/scale; fp32 result."""
    return launch_modln(h, shift, scale, weight, bias, eps)


@modulated_layernorm.register_fake
def _(h, shift, scale, weight=None, bias=None, eps=1e-6):
    return h.new_empty(h.shape, dtype=torch.float32)


def modulated_layernorm_ref(h, shift, scale, weight=None, bias=None, eps=1e-6):
    """Plain torch, as the head computes it."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    y = F.layer_norm(h.float(), (h.shape[-1],), w, b, eps)
    return y * (1 + scale.float()) + shift.float()
