"""Causal attention with a static KV cache (the gpt-fast pattern), shared by the causal families.

The cache holds every layer's keys and values for a fixed (batch, length, dtype, device): it is
allocated once and reused by every call of that shape, so a decode step always sees the same
tensor shapes. A step writes its new keys / values at `input_pos` (a tensor, never a Python int:
the step's graph does not change with the position) and attends to the whole buffer under a
mask `positions <= input_pos`; positions not written yet are masked out, so stale entries of an
earlier call never leak into a later one.

    cache = StaticKVCache(n_layer, batch, n_kv_head, length, head_dim, torch.float32, device)
    out = prefill_attention(q, k, v, cache, layer)            # positions 0..S-1, causal
    out = decode_attention(q, k, v, cache, layer, input_pos)  # one position, input_pos: [1]
    out = decode_attention(q, k, v, cache, layer, positions)  # one position per row: [B]

Continuous batching (engine.serving) keeps one `SlotCache` of many rows: every image in flight
owns rows of it, each at its own position; `rows(n)` is the view of the first n rows a step runs
over (the slots stay compacted, so the view is a plain slice: no gather).

q is [B, H, S, D]; k, v are [B, Hkv, S, D] (grouped-query attention when Hkv < H: the keys and
values are repeated per query head, as the published code does). No host synchronisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class StaticKVCache:
    """Keys and values [n_layer, B, Hkv, L, D] of one (batch, length, dtype, device)."""

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, length: int, head_dim: int,
                 dtype=torch.float32, device="cpu"):
        shape = (max(n_layer, 1), batch, n_kv_head, length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.arange(length, device=device)

    @property
    def key(self) -> tuple:
        _, batch, heads, length, dim = self.k.shape
        return (batch, heads, length, dim, self.k.dtype, self.k.device)

    @property
    def length(self) -> int:
        return self.k.shape[3]

    def rows(self, start: int, stop: int) -> "StaticKVCache":
        """A cache over rows [start, stop) that shares this one's storage (writes go through)."""
        view = StaticKVCache.__new__(StaticKVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.positions = self.positions
        return view

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` (every layer, every position) onto row `dst`."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


def window_attention(q, k, v, cache: StaticKVCache, layer: int, start) -> torch.Tensor:
    """Positions start .. start + W - 1 at once (speculative decoding's verification pass):
    write their keys / values, each attends causally to the cached positions <= its own.
    `start`: a Python int shared by every row, or an int64 tensor [B], one per row."""
    b, w = q.shape[0], q.shape[2]
    if isinstance(start, int):
        cache.k[layer][:, :, start:start + w] = k
        cache.v[layer][:, :, start:start + w] = v
        query_pos = torch.arange(start, start + w, device=q.device).expand(b, -1)
    else:
        query_pos = start[:, None] + torch.arange(w, device=q.device)            # [B, W]
        index = query_pos[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        cache.k[layer].scatter_(2, index, k)
        cache.v[layer].scatter_(2, index, v)
    mask = (cache.positions[None, None, :] <= query_pos[:, :, None]).view(b, 1, w, -1)
    n_head = q.shape[1]
    keys, values = _repeat_kv(cache.k[layer], n_head), _repeat_kv(cache.v[layer], n_head)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def _repeat_kv(x: torch.Tensor, n_head: int) -> torch.Tensor:
    groups = n_head // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def prefill_attention(q, k, v, cache: StaticKVCache, layer: int) -> torch.Tensor:
    """Causal attention over positions 0..S-1; their keys and values go into the cache."""
    s = q.shape[2]
    cache.k[layer, :, :, :s] = k
    cache.v[layer, :, :, :s] = v
    n_head = q.shape[1]
    return F.scaled_dot_product_attention(q, _repeat_kv(k, n_head), _repeat_kv(v, n_head), is_causal=True)


def decode_attention(q, k, v, cache: StaticKVCache, layer: int, input_pos: torch.Tensor) -> torch.Tensor:
    """One new position `input_pos` ([1] int64 tensor, shared by every row; or [B], one per row):
    write its key / value, attend to every cached position <= input_pos. Fixed shapes whatever
    the position."""
    if input_pos.shape[0] == 1:
        cache.k[layer].index_copy_(2, input_pos, k)
        cache.v[layer].index_copy_(2, input_pos, v)
        mask = (cache.positions <= input_pos).view(1, 1, 1, -1)
    else:
        rows = torch.arange(q.shape[0], device=q.device)
        cache.k[layer][rows, :, input_pos] = k[:, :, 0]
        cache.v[layer][rows, :, input_pos] = v[:, :, 0]
        mask = (cache.positions[None, :] <= input_pos[:, None]).view(q.shape[0], 1, 1, -1)
    n_head = q.shape[1]
    keys, values = _repeat_kv(cache.k[layer], n_head), _repeat_kv(cache.v[layer], n_head)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
