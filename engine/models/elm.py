"""ELM's class-conditional AR transformer (Pepper-lll/LMforImageGeneration `llama/ar_model.py`
`Transformer`, a LlamaGen-style decoder over binary-autoencoder sub-tokens), state-dict
compatible: `cls_embedding.embedding_table`, `tok_embedder.{i}` + `proj` (or one `tok_embedder`
when token_each == 1), `layers.{i}.attention.{wqkv,wo}`, `layers.{i}.feed_forward.{w1,w2,w3}`,
`layers.{i}.{attention_norm,ffn_norm}`, `norm`, `output.{i}` (or one `output`).

Three ways to run it, giving the same logits up to float32 rounding:
  forward(idx, cond)                 the published full-prefix pass (every position, every head)
  prefill(labels, idx, cache)        class token (+ a prefix) into a static KV cache, last logits
  decode(tokens, input_pos, cache)   one new position against the cache, its logits

Reproduced as published (see engine/families/elm.py for the sampling quirks):
  * RMSNorm computed in float32: x * rsqrt(mean(x^2) + eps), then the gain.
  * 2D RoPE over the grid, adjacent channel pairs rotated; the table starts with
    `cls_token_num` all-zero rows (cos = sin = 0), so the class position's q and k are zero
    vectors: every query gives the class key the score 0, and the class query attends uniformly.
    Image token j sits at sequence position j + 1 and reads table row j + 1 (with
    cls_token_num > 1 the first image tokens read zero rows too: the published off-by-rows).
  * Output heads in float32, stacked per position: logits [B, S * token_each, V].
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kv_cache import StaticKVCache, decode_attention, prefill_attention, window_attention


def rope_table_2d(grid: int, head_dim: int, base: float, zero_rows: int) -> torch.Tensor:
    """[zero_rows + grid^2, head_dim // 2, 2] (cos, sin), computed on the CPU in float32 as the
    published precompute_freqs_cis_2d: half the rotary pairs follow the row, half the column."""
    half = head_dim // 2
    exponents = torch.arange(0, half, 2, device="cpu")[: half // 2].float() / half
    inv = 1.0 / (base ** exponents)
    angles = torch.outer(torch.arange(grid, device="cpu"), inv)            # [grid, head_dim // 4]
    grid_angles = torch.cat([angles[:, None, :].expand(-1, grid, -1),
                             angles[None, :, :].expand(grid, -1, -1)], dim=-1)
    table = torch.stack([torch.cos(grid_angles), torch.sin(grid_angles)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(zero_rows, half, 2, device="cpu"), table])


def rope_table_1d(seq: int, head_dim: int, base: float) -> torch.Tensor:
    """[seq, head_dim // 2, 2] (cos, sin) of 1D RoPE, as the published precompute_freqs_cis
    (torch.polar, so the values are the published ones bit for bit): one angle per element."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device="cpu")[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(seq, device="cpu"), inv)
    rotation = torch.polar(torch.ones_like(angles), angles)
    return torch.stack([rotation.real, rotation.imag], dim=-1)


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D], freqs [S, D // 2, 2] (or [B, S, D // 2, 2]: one table per row): rotate
    adjacent channel pairs (in float32)."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    rows = freqs.shape[0] if freqs.ndim == 4 else 1
    f = freqs.view(rows, xs.shape[1], 1, xs.shape[3], 2)
    out = torch.stack([xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1],
                       xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LabelEmbedder(nn.Module):
    """`embedding_table` with num_classes rows + one CFG null row (when class_dropout_prob > 0)."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(rows, dim)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv_head: int):
        super().__init__()
        self.dim, self.n_head, self.n_kv_head = dim, n_head, n_kv_head
        self.head_dim = dim // n_head
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def qkv(self, x, freqs):
        """q [B, H, S, D], k / v [B, Hkv, S, D], rotated."""
        b, s, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv, kv], dim=-1)
        q = apply_rotary(q.view(b, s, self.n_head, self.head_dim), freqs)
        k = apply_rotary(k.view(b, s, self.n_kv_head, self.head_dim), freqs)
        v = v.view(b, s, self.n_kv_head, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def out(self, o):
        b, _, s, _ = o.shape
        return self.wo(o.transpose(1, 2).contiguous().view(b, s, self.dim))

    def forward(self, x, freqs):
        """The published pass: causal attention over the whole sequence, no cache."""
        q, k, v = self.qkv(x, freqs)
        groups = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        self.attention = Attention(c.dim, c.n_head, c.kv_heads)
        self.feed_forward = FeedForward(c.dim, c.hidden_dim)
        self.attention_norm = RMSNorm(c.dim, c.norm_eps)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps)

    def forward(self, x, freqs):
        h = x + self.attention(self.attention_norm(x), freqs)
        return h + self.feed_forward(self.ffn_norm(h))

    def cached(self, x, freqs, cache, layer, input_pos=None, window_start=None):
        """The same block against a KV cache: prefill (input_pos None), one-position decode, or
        a window of positions from `window_start` (an int; speculative decoding)."""
        q, k, v = self.attention.qkv(self.attention_norm(x), freqs)
        if window_start is not None:
            o = window_attention(q, k, v, cache, layer, window_start)
        elif input_pos is None:
            o = prefill_attention(q, k, v, cache, layer)
        else:
            o = decode_attention(q, k, v, cache, layer, input_pos)
        h = x + self.attention.out(o)
        return h + self.feed_forward(self.ffn_norm(h))


class ELMTransformer(nn.Module):
    """The published `Transformer` for `engine.families.elm.ELMConfig` (rope2d, sdp attention,
    no adaLN: the configuration ELM's released checkpoints use)."""

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        self.token_each, self.vocab_size = c.token_each, c.vocab_size
        self.cls_embedding = LabelEmbedder(c.class_rows, c.dim)
        if c.token_each > 1:
            self.tok_embedder = nn.ModuleList(nn.Embedding(c.vocab_size, c.dim) for _ in range(c.token_each))
            self.proj = nn.Linear(c.token_each * c.dim, c.dim, bias=False)
        else:
            self.tok_embedder = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(TransformerBlock(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        if c.token_each > 1:
            self.output = nn.ModuleList(nn.Linear(c.dim, c.vocab_size, bias=False) for _ in range(c.token_each))
        else:
            self.output = nn.Linear(c.dim, c.vocab_size, bias=False)
        # Recomputed from the configuration (the published model keeps it as a plain attribute,
        # not in its state dict); on the CPU even when the module is built on the meta device.
        self.register_buffer("freqs_cis", rope_table_2d(c.grid, c.head_dim, c.rope_base, c.cls_token_num),
                             persistent=False)

    # Pieces ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def embed_class(self, labels: torch.Tensor) -> torch.Tensor:
        """[B, 1, dim]: one class position (whatever cls_token_num is, as published)."""
        return self.cls_embedding.embedding_table(labels).unsqueeze(1)

    def embed_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, S, token_each] -> [B, S, dim]: sub-token embeddings concatenated, projected."""
        if self.token_each == 1:
            return self.tok_embedder(idx).squeeze(-2)
        return self.proj(torch.cat([emb(idx[:, :, i]) for i, emb in enumerate(self.tok_embedder)], dim=-1))

    def heads(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + one head per sub-token: [B, S, dim] -> float32 [B, S, token_each, V]."""
        h = self.norm(h)
        if self.token_each == 1:
            return self.output(h).float().unsqueeze(2)
        return torch.stack([head(h).float() for head in self.output], dim=2)

    # The published full-prefix pass ------------------------------------------------------------
    def forward(self, idx: torch.Tensor | None, cond: torch.Tensor) -> torch.Tensor:
        """Published `Transformer.forward(idx, cond)` at inference: logits [B, (S+1) * token_each, V]
        for the class position and every token of idx [B, S, token_each] (None: none)."""
        h = self.embed_class(cond)
        if idx is not None:
            h = torch.cat([h, self.embed_tokens(idx)], dim=1)
        freqs = self.freqs_cis[: h.shape[1]]
        for layer in self.layers:
            h = layer(h, freqs)
        logits = self.heads(h)
        return logits.reshape(logits.shape[0], -1, logits.shape[-1])

    # KV-cached passes -----------------------------------------------------------------------
    def new_cache(self, batch: int, dtype=torch.float32) -> StaticKVCache:
        """A cache for every position a call can use: the class position + block_size tokens
        (the published table length, cls_token_num + block_size)."""
        c = self.config
        return StaticKVCache(c.n_layer, batch, c.kv_heads, self.freqs_cis.shape[0], c.head_dim,
                             dtype, self.device)

    def prefill(self, labels: torch.Tensor, idx: torch.Tensor | None, cache: StaticKVCache) -> torch.Tensor:
        """Class position (+ the prefix idx [B, P, token_each]) into the cache at positions 0..P;
        the last position's logits [B, token_each, V]."""
        h = self.embed_class(labels)
        if idx is not None and idx.shape[1]:
            h = torch.cat([h, self.embed_tokens(idx)], dim=1)
        freqs = self.freqs_cis[: h.shape[1]]
        for i, layer in enumerate(self.layers):
            h = layer.cached(h, freqs, cache, i)
        return self.heads(h[:, -1:])[:, 0]

    def decode_window(self, tokens: torch.Tensor, start, cache: StaticKVCache) -> torch.Tensor:
        """tokens [B, W, token_each] at sequence positions start .. start + W - 1 (start >= 1: an
        int, or an int64 tensor [B] with one start per row):
        write them into the cache, return their logits [B, W, token_each, V] (speculative
        decoding verifies a window of drafted tokens in this one pass)."""
        h = self.embed_tokens(tokens)
        if isinstance(start, int):
            freqs = self.freqs_cis[start:start + tokens.shape[1]]
        else:   # one start per row: [B, W, D // 2, 2]
            freqs = self.freqs_cis[start[:, None] + torch.arange(tokens.shape[1], device=start.device)]
        for i, layer in enumerate(self.layers):
            h = layer.cached(h, freqs, cache, i, window_start=start)
        return self.heads(h)

    def decode(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """tokens [B, token_each] at sequence position input_pos ([1] int64 tensor, or [B]: one
        per row): write the position into the cache, return its logits [B, token_each, V]."""
        h = self.embed_tokens(tokens.unsqueeze(1))
        freqs = self.freqs_cis.index_select(0, input_pos)
        if input_pos.shape[0] > 1:
            freqs = freqs.unsqueeze(1)                           # [B, 1, D // 2, 2]
        for i, layer in enumerate(self.layers):
            h = layer.cached(h, freqs, cache, i, input_pos)
        return self.heads(h)[:, 0]
