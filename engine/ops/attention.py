"""Bidirectional attention: flash-attention when installed and usable; on the CPU, for the native
backend's transformer, the native extension's kernel (csrc/attention.cpp); else PyTorch SDPA."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# Fewer query rows than this (the last decoder block attends from the predicted rows only, a few
# a step): SDPA, since packing every head's keys then costs more than the kernel saves (320 keys,
# 6 queries: 0.84x SDPA; 128-320 queries: 1.5-1.7x, float32 and bf16, on a 2-core Zen 5).
NATIVE_MIN_QUERIES = 16


@functools.lru_cache(maxsize=1)
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func  # optional extra: engine[flash]
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    return flash_attn_func


def flash_usable(q: torch.Tensor) -> bool:
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and q.shape[-1] % 8 == 0 and _flash_attn_func() is not None)


@functools.lru_cache(maxsize=1)
def _native():
    """The native extension when it builds and has the attention kernel, else None."""
    from ..native import build as native_build

    ext = native_build.extension_or_none()
    return ext if hasattr(ext, "attention") else None


def native_available() -> bool:
    return _native() is not None


@torch.library.custom_op("engine::cpu_attention", mutates_args=())
def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v on the CPU (native kernel): q [B, H, Lq, D], k/v [B, H, Lk, D],
    float32 or bfloat16 (float32 arithmetic) -> [B, H, Lq, D] contiguous, q's dtype."""
    return _native().attention(q, k, v, scale)


@cpu_attention.register_fake
def _cpu_attention_fake(q, k, v, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def native_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
            and k.dtype == q.dtype and v.dtype == q.dtype and q.shape[-2] >= NATIVE_MIN_QUERIES
            and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, native: bool = False) -> torch.Tensor:
    """q [B, H, Nq, hd], k/v [B, H, N, hd] -> [B, H, Nq, hd], softmax scale hd**-0.5, no mask.
    `native`: the caller's transformer runs on the native CPU backend (the kernel where usable)."""
    if flash_usable(q):
        # flash-attn takes [B, N, H, hd].
        out = _flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if native and native_usable(q, k, v):
        return cpu_attention(q, k, v, q.shape[-1] ** -0.5)
    return F.scaled_dot_product_attention(q, k, v)
