"""GEMM `prologue(x) @ W^T + b` with fused prologue/epilogue, W in nn.Linear layout [N, K].

Prologues: none, or SiLU of (x + row) where `row` is one [K] vector added to every row; that is
the adaLN input silu(t_emb[i] + c_emb) with the time embedding of the current step.
Epilogues: bias; bias + SiLU; bias then `res + gate * u` (ResBlock residual; res and gate are
[M, N] row-strided, gate usually a column slice of the modulation GEMM output).
Weights may be fp32/bf16/fp16; products and sums are fp32 (weights are upcast after loading).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .utils import check_rows, dot_precision, interpret, launch, pow2, silu

PRO_NONE, PRO_SILU = 0, 1
EPI_BIAS, EPI_SILU, EPI_GATE_RES = 0, 1, 2


@triton.jit
def _linear_kernel(x_ptr, row_ptr, w_ptr, b_ptr, res_ptr, gate_ptr, out_ptr,
                   M, N, K, stride_x, stride_res, stride_gate, stride_out,
                   PROLOGUE: tl.constexpr, HAS_ROW: tl.constexpr, EPILOGUE: tl.constexpr,
                   PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # Output columns on axis 0: at small M the N tiles are what spreads work over the GPU.
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rk = tl.arange(0, BK)
    mmask = rm < M
    nmask = rn < N
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + rk
        kmask = k < K
        a = tl.load(x_ptr + rm[:, None] * stride_x + k[None, :],
                    mask=mmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        if HAS_ROW:
            a = tl.load(row_ptr + k, mask=kmask, other=0.0).to(tl.float32)[None, :] + a
        if PROLOGUE == 1:
            a = silu(a)  # silu(0) = 0, so masked lanes stay zero
        # Cast before tl.dot: bf16 dot is wrong in the interpreter, and fp32 sums are the point.
        w = tl.load(w_ptr + rn[:, None] * K + k[None, :],
                    mask=nmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
    u = acc + tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    omask = mmask[:, None] & nmask[None, :]
    if EPILOGUE == 1:
        u = silu(u)
    elif EPILOGUE == 2:
        res = tl.load(res_ptr + rm[:, None] * stride_res + rn[None, :], mask=omask, other=0.0)
        gate = tl.load(gate_ptr + rm[:, None] * stride_gate + rn[None, :], mask=omask, other=0.0)
        u = res.to(tl.float32) + gate.to(tl.float32) * u
    tl.store(out_ptr + rm[:, None] * stride_out + rn[None, :], u, mask=omask)


def linear_config(M: int, N: int, K: int) -> dict:
    if interpret():  # a single fixed shape rule, large tiles: fewer interpreted programs
        return dict(BM=pow2(M, hi=64), BN=pow2(N, hi=1024), BK=pow2(K, hi=256), num_warps=4)
    # Small M is the common case (one MAR step's rows): memory bound on W, so many N tiles.
    return dict(BM=pow2(M, hi=64), BN=64, BK=32 if M > 16 else 64, num_warps=4)


def launch_linear(x, weight, bias, *, row=None, prologue=PRO_NONE, epilogue=EPI_BIAS,
                  res=None, gate=None, config=None):
    check_rows(x, "x")
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape != (N, K) or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [N, {K}] matrix, got {tuple(weight.shape)}")
    if row is not None and row.shape != (K,):
        raise ValueError(f"row must be [{K}], got {tuple(row.shape)}")
    if epilogue == EPI_GATE_RES:
        for t, name in ((res, "res"), (gate, "gate")):
            if t is None or t.shape != (M, N):
                raise ValueError(f"{name} must be [{M}, {N}] for the gate/residual epilogue")
            check_rows(t, name)
    out = torch.empty(M, N, device=x.device, dtype=torch.float32)
    if M == 0:
        return out
    cfg = dict(config or linear_config(M, N, K))
    num_warps = cfg.pop("num_warps", 4)
    grid = (triton.cdiv(N, cfg["BN"]), triton.cdiv(M, cfg["BM"]))
    res_t = res if res is not None else x   # placeholders are never read
    gate_t = gate if gate is not None else x
    launch("linear_epilogue", _linear_kernel, grid,
           x, row if row is not None else x, weight, bias.contiguous(), res_t, gate_t, out,
           M, N, K, x.stride(0), res_t.stride(0), gate_t.stride(0), out.stride(0),
           PROLOGUE=prologue, HAS_ROW=row is not None, EPILOGUE=epilogue,
           PRECISION=dot_precision(weight.dtype), num_warps=num_warps,
           enable_fp_fusion=True, **cfg)
    return out


@torch.library.custom_op("engine::linear_epilogue", mutates_args=())
def linear_epilogue(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    row: Optional[torch.Tensor] = None, prologue: int = PRO_NONE,
                    epilogue: int = EPI_BIAS, res: Optional[torch.Tensor] = None,
                    gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """epilogue(prologue(x [+ row]) @ weight^T + bias) in fp32, see the module docstring."""
    return launch_linear(x, weight, bias, row=row, prologue=prologue, epilogue=epilogue,
                         res=res, gate=gate)


@linear_epilogue.register_fake
def _(x, weight, bias, row=None, prologue=PRO_NONE, epilogue=EPI_BIAS, res=None, gate=None):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)


def linear_epilogue_ref(x, weight, bias, row=None, prologue=PRO_NONE, epilogue=EPI_BIAS,
                        res=None, gate=None):
    """Plain torch in the head's operation order (weights upcast to fp32)."""
    a = x.float()
    if row is not None:
        a = row.float() + a
    if prologue == PRO_SILU:
        a = torch.nn.functional.silu(a)
    u = torch.nn.functional.linear(a, weight.float(), bias.float())
    if epilogue == EPI_SILU:
        u = torch.nn.functional.silu(u)
    elif epilogue == EPI_GATE_RES:
        u = res.float() + gate.float() * u
    return u
