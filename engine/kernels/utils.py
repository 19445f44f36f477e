"""Shared pieces of the Triton kernels: interpreter detection, launch counting, dtype rules."""
from __future__ import annotations

import os
from collections import Counter
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

# Every host launcher bumps this once per Triton launch, so tests can count launches per
# diffusion step without a profiler (and without a GPU).
LAUNCHES: Counter = Counter()

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpret() -> bool:
    """True when kernels run in Triton's CPU interpreter (tests): then a fixed config is used."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_BLAS = []


def _one_blas_thread():
    """The interpreter runs tl.dot as tiny numpy matmuls, where a multi-threaded BLAS only
    adds overhead (a lot of it on a busy machine): use one thread while interpreting."""
    if not _BLAS:
        try:
            from threadpoolctl import ThreadpoolController
            _BLAS.append(ThreadpoolController())
        except Exception:  # optional dependency
            _BLAS.append(None)
    return nullcontext() if _BLAS[0] is None else _BLAS[0].limit(limits=1, user_api="blas")


def launch(name: str, kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), counted in LAUNCHES under `name`."""
    with _one_blas_thread() if interpret() else nullcontext():
        kernel[grid](*args, **kwargs)
    LAUNCHES[name] += 1


def pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    """Next power of two >= n, clamped to [lo, hi]. tl.dot needs every block dim >= 16."""
    p = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return p if hi is None else min(p, hi)


def dot_precision(weight_dtype: torch.dtype) -> str:
    """fp32 weights: exact fp32 products ("ieee", no TF32 rounding of weights or inputs).
    bf16/fp16 weights: "tf32" is exact on the weights (their mantissas fit TF32's 10 bits) and
    only rounds the fp32 activations, well inside the bf16-weight tolerance, while using tensor
    cores. The interpreter ignores the setting (fp32 numpy matmul either way)."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise TypeError(f"weights must be one of {WEIGHT_DTYPES}, got {weight_dtype}")
    return "ieee" if weight_dtype == torch.float32 else "tf32"


def check_rows(t: torch.Tensor, name: str) -> None:
    """Kernels take a row stride but assume unit column stride."""
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"{name} must be 2-D with contiguous rows, got shape {tuple(t.shape)} "
                         f"strides {t.stride()}")


@triton.jit
def silu(x):
    # Same formula as torch's CPU kernel: x / (1 + exp(-x)).
    return x / (1.0 + tl.exp(-x))


@triton.jit
def row_moments(ptr, rows, stride, rmask, N, eps, BM: tl.constexpr, BK: tl.constexpr):
    """Mean and 1/sqrt(var + eps) of BM rows of length N, two passes over the row (centred
    variance, as exact as torch's Welford in fp32; rows are short and stay in L1/L2)."""
    cols = tl.arange(0, BK)
    acc = tl.zeros([BM, BK], dtype=tl.float32)
    for k0 in range(0, N, BK):
        m = rmask[:, None] & (k0 + cols < N)[None, :]
        x = tl.load(ptr + rows[:, None] * stride + k0 + cols[None, :], mask=m, other=0.0)
        acc += x.to(tl.float32)
    mean = tl.sum(acc, axis=1) / N
    acc = tl.zeros([BM, BK], dtype=tl.float32)
    for k0 in range(0, N, BK):
        m = rmask[:, None] & (k0 + cols < N)[None, :]
        x = tl.load(ptr + rows[:, None] * stride + k0 + cols[None, :], mask=m, other=0.0)
        d = tl.where(m, x.to(tl.float32) - mean[:, None], 0.0)
        acc += d * d
    var = tl.sum(acc, axis=1) / N
    # IEEE-rounded sqrt and division (the defaults are approximate on GPU).
    return mean, tl.div_rn(tl.full([BM], 1.0, tl.float32), tl.sqrt_rn(var + eps))
