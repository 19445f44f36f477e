"""Bidirectional attention: flash-attention when installed and usable, else PyTorch SDPA."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, H, Nq, hd], k/v [B, H, N, hd] -> [B, H, Nq, hd], softmax scale hd**-0.5, no mask."""
    if flash_usable(q):
        # flash-attn takes [B, N, H, hd].
        out = _flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)
