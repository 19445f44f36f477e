"""Fluid (text-to-image MAR), inference only, state-dict compatible with LightGen's `FLUID`
(models/fluid_arbitrary.py, models/utils.py): a text aligner, an encoder over the known tokens
only (no class or buffer rows: empty at the first step), a decoder, and a text decoder of
cross-attention blocks, then MAR's diffusion head.

The sampling step is the published one rearranged, with the same values:
  * the text side of every cross-attention block (aligner, `normkv`, the K/V projection) is the
    same at every MAR step, so it is computed once per call (`step_context`);
  * cross-attention blocks treat each query row on its own (queries attend to the text only),
    so the last decoder block, the decoder norm and the whole text decoder run on the predicted
    rows alone;
  * position embeddings interpolated for a token grid are computed once per resolution.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.attention import attention
from ..core.errors import SamplingError
from ..ops.head import DiffLoss
from .mar import LN_EPS, AttentionBase, Block, Linear, Mlp, gather_rows, pack_blocks, unpatchify

BASE_GRID = 16   # LightGen stores position embeddings for 16 x 16 tokens (its "256px" checkpoints)


class TextProjection(nn.Module):
    """PixArt-alpha's caption projection (diffusers' PixArtAlphaTextProjection keys)."""

    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class TextAligner(nn.Module):
    """LightGen's `Text_Embedding`: projection, `text_depth` ViT blocks, LayerNorm. With
    `max_length` (engine option FluidConfig.text_positions) a learned table of text positions is
    added after the projection, so the aligner knows word order beyond what the encoder keeps."""

    def __init__(self, caption_channels, width, num_heads, depth, mlp_ratio, eps, max_length: int = 0):
        super().__init__()
        self.text_proj = TextProjection(caption_channels, width)
        if max_length:
            self.text_pos_embed = nn.Parameter(torch.zeros(1, max_length, width))
        self.text_aligner = nn.ModuleList(Block(width, num_heads, mlp_ratio, eps) for _ in range(depth))
        self.text_aligner_norm = nn.LayerNorm(width, eps=eps)

    def forward(self, texts):
        x = self.text_proj(texts)
        if hasattr(self, "text_pos_embed"):
            x = x + self.text_pos_embed[:, :x.shape[1]].to(x.dtype)
        for block in self.text_aligner:
            x = block(x)
        return self.text_aligner_norm(x)


class CrossAttention(AttentionBase):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query_linear = Linear(dim, dim)
        self.kv = Linear(dim, 2 * dim)
        self.proj = Linear(dim, dim)

    def keys_values(self, text: torch.Tensor):
        """K, V [B, H, Lt, hd] of (normalised) text rows: once per call."""
        b, length, dim = text.shape
        k, v = self.kv(text).reshape(b, length, 2, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, q_rows, k, v):
        b, n, dim = q_rows.shape
        q = self.query_linear(q_rows).reshape(b, n, self.num_heads, dim // self.num_heads).transpose(1, 2)
        out = attention(q, k.to(q.dtype), v.to(q.dtype), native=self.use_native_kernel)
        return self.proj(out.transpose(1, 2).reshape(b, n, dim))


class CrossBlock(nn.Module):
    """LightGen's `Attention_Block(is_cross=True)`. Quirk reproduced: the residual is taken from
    the *normalised* query, `q = normq(x); x = q + attn(q, normkv(text))`; no text padding mask."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.normq = nn.LayerNorm(dim, eps=eps)
        self.normkv = nn.LayerNorm(dim, eps=eps)
        self.attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def keys_values(self, text):
        return self.attn.keys_values(self.normkv(text))

    def forward(self, x, k, v):
        q = self.normq(x)
        x = q + self.attn(q, k, v)
        return x + self.mlp(self.norm2(x))


def interpolate_positions(pos: torch.Tensor, grid, offset: float, w_major: bool = True) -> torch.Tensor:
    """LightGen's `interpolate_pos_encoding`: [1, 256, dim] -> [1, h*w, dim] for grid (h, w).

    Bicubic on the [1, dim, 16, 16] view with scale factors ((w + offset) / 16, (h + offset) / 16),
    read back as [1, w*h, dim]: for non-square grids the rows come out w-major while tokens are
    h-major; reproduced as published (`w_major=True`). Its cost: for a 2:1 grid, token columns c
    and c + w/2 get neighbouring rows of the interpolated table, so the two halves of the image
    are hard to tell apart. `w_major=False` (an engine option, FluidConfig.interpolate_w_major)
    interpolates to (h, w) with factors ((h + offset) / 16, (w + offset) / 16) and reads it back
    h-major, the tokens' order."""
    h, w = grid
    n, dim = pos.shape[1], pos.shape[2]
    if n == h * w and h == w:
        return pos
    m = int(math.sqrt(n))
    size = (w, h) if w_major else (h, w)
    kwargs = ({"scale_factor": tuple(float(s + offset) / m for s in size)} if offset else {"size": size})
    out = F.interpolate(pos.float().reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic", **kwargs)
    if tuple(out.shape[-2:]) != size:
        raise SamplingError(f"position interpolation to a {h} x {w} grid gave {tuple(out.shape[-2:])}")
    return out.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos.dtype)


class Fluid(nn.Module):
    """Parameter names follow LightGen's FLUID."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        e, d, x, eps, length = c.encoder_embed_dim, c.decoder_embed_dim, c.cross_embed_dim, c.norm_eps, BASE_GRID ** 2
        self.last_embed = nn.Linear(d, x)
        self.last_pos_embed_learned = nn.Parameter(torch.zeros(1, length, x))
        self.fake_latent = nn.Parameter(torch.zeros(1, 1, x))
        self.text_emb = TextAligner(c.caption_channels, e, c.encoder_num_heads, c.text_depth, c.mlp_ratio, eps,
                                    c.max_length if c.text_positions else 0)
        self.cross_attn_blocks = nn.ModuleList(
            CrossBlock(x, c.cross_num_heads, c.mlp_ratio, eps) for _ in range(c.cross_depth))
        self.cross_norm = nn.LayerNorm(x, eps=eps)
        self.z_proj = Linear(c.token_dim, e)
        self.z_proj_ln = nn.LayerNorm(e, eps=LN_EPS)   # 1e-6 whatever norm_layer is (published)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, length, e))
        self.encoder_blocks = nn.ModuleList(
            Block(e, c.encoder_num_heads, c.mlp_ratio, eps) for _ in range(c.encoder_depth))
        self.encoder_norm = nn.LayerNorm(e, eps=eps)
        self.decoder_embed = Linear(e, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, length, d))
        if c.decoder_text:   # engine option: the text rows prefix the decoder's sequence
            self.decoder_text_embed = nn.Linear(x, d)
        if c.encoder_text:   # engine option: the text rows prefix the encoder's sequence
            self.encoder_text_embed = nn.Linear(x, e)
        self.decoder_blocks = nn.ModuleList(
            Block(d, c.decoder_num_heads, c.mlp_ratio, eps) for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(d, eps=eps)
        self.diffloss = DiffLoss(c.token_dim, d, c.diffloss_w, c.diffloss_d)
        self._positions: dict = {}

    def pack_linears(self, dtype: torch.dtype | None) -> None:
        last = self.decoder_blocks[-1] if len(self.decoder_blocks) else None
        pack_blocks([*self.encoder_blocks, *self.decoder_blocks, *self.cross_attn_blocks], last, dtype,
                    (self.z_proj, self.decoder_embed))

    # The family interface --------------------------------------------------------------------
    def grid(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """Token grid of an image size (the model's img_size x (img_width or img_size) by default)."""
        c = self.config
        unit = c.vae_stride * c.patch_size
        height = c.img_size if height is None else height
        width = (c.img_width or c.img_size) if width is None else width
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < unit or value % unit:
                raise SamplingError(f"{name} must be a positive multiple of vae_stride * patch_size "
                                    f"= {unit}, got {value!r}")
        grid = (height // unit, width // unit)
        if grid[0] * grid[1] > c.max_seq_len:
            raise SamplingError(f"height x width: {height} x {width} is {grid[0] * grid[1]} tokens; "
                                f"the limit is {c.max_seq_len} (max_seq_len)")
        return grid

    def positions(self, grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(encoder, decoder, text-decoder) position embeddings for `grid`, once per resolution."""
        params = (self.encoder_pos_embed_learned, self.decoder_pos_embed_learned, self.last_pos_embed_learned)
        weights = tuple((p.data_ptr(), p.device, p.dtype, p._version) for p in params)
        cache = self._positions   # a local reference: safe when threads share the model
        if cache.get("weights") != weights:   # moved, reloaded or edited: start afresh
            cache = self._positions = {"weights": weights}
        grid = tuple(grid)
        if grid not in cache:
            offset, w_major = self.config.interpolate_offset, self.config.interpolate_w_major
            cache[grid] = tuple(interpolate_positions(p.detach(), grid, offset, w_major) for p in params)
        return cache[grid]

    def text_condition(self, texts: torch.Tensor | None, bsz: int) -> torch.Tensor:
        """Aligned text rows [B, Lt, X]; without texts the null text (fake_latent, after the
        aligner as published)."""
        if texts is None:
            return self.null_text(bsz)
        return self.text_emb(texts)

    def null_text(self, bsz: int) -> torch.Tensor:
        return self.fake_latent.expand(bsz, self.config.max_length, self.config.cross_embed_dim)

    def decoder_text_rows(self, text: torch.Tensor) -> torch.Tensor | None:
        """The decoder's text prefix [B, Lt, D] from aligned (or null) text rows; None unless
        FluidConfig.decoder_text."""
        return self.decoder_text_embed(text) if self.config.decoder_text else None

    def encoder_text_rows(self, text: torch.Tensor) -> torch.Tensor | None:
        """The encoder's text prefix [B, Lt, E] from aligned (or null) text rows; None unless
        FluidConfig.encoder_text."""
        return self.encoder_text_embed(text) if self.config.encoder_text else None

    def step_context(self, condition, bsz: int, use_cfg: bool, grid) -> tuple[torch.Tensor, ...]:
        """(encoder / decoder / text-decoder positions, with decoder_text the decoder's text
        prefix, then K and V of every cross block)."""
        if condition.kind not in ("text", "none"):
            raise SamplingError(f"Fluid is text-conditioned; got a {condition.kind!r} condition")
        c = self.config
        if condition.kind == "text" and c.encoder_embed_dim != c.cross_embed_dim:
            raise SamplingError(f"this model cannot condition on text: its text aligner gives "
                                f"{c.encoder_embed_dim}-wide rows and its cross-attention reads "
                                f"{c.cross_embed_dim} (as published); sample with texts=None")
        text = self.text_condition(condition.value, bsz)
        if use_cfg:
            text = torch.cat([text, self.null_text(bsz)])
        kv = [t for block in self.cross_attn_blocks for t in block.keys_values(text)]
        prefix = (self.decoder_text_rows(text),) if self.config.decoder_text else ()
        prefix += (self.encoder_text_rows(text),) if self.config.encoder_text else ()
        return (*self.positions(grid), *prefix, *kv)

    def unpatchify(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        return unpatchify(tokens, self.config.patch_size, self.config.vae_embed_dim, grid[0], grid[1])

    # The step --------------------------------------------------------------------------------
    def encode(self, tokens, known, enc_pos, text_rows=None):
        """Encoder over the known tokens only (none at the first step); with `text_rows [B, Lt, E]`
        (FluidConfig.encoder_text) over [text; known tokens], as MAR's over [buffer; known]."""
        b = tokens.shape[0]
        x = self.z_proj(gather_rows(tokens, known)) + gather_rows(enc_pos.expand(b, -1, -1), known)
        x = self.z_proj_ln(x)
        if text_rows is not None:
            x = torch.cat([text_rows.to(x.dtype), x], dim=1)
        if x.shape[1]:   # static: the first step's encoder input is empty without text rows
            for block in self.encoder_blocks:
                x = block(x)
        return self.encoder_norm(x)

    def decode(self, x, known, predict, dec_pos, text_rows=None):
        """Decoder over the full sequence; returns the rows of `predict [B, n]` only. With
        `text_rows [B, Lt, D]` (FluidConfig.decoder_text) the sequence is [text; image], so every
        decoder block attends to the text as MAR's blocks attend to their class rows. With
        FluidConfig.encoder_text, `x`'s first rows are the encoder's text rows: they prefix the
        sequence too (after the decoder_text rows), as MAR's buffer rows do."""
        x = self.decoder_embed(x)
        b, d = x.shape[0], self.config.decoder_embed_dim
        encoder_prefix = x.shape[1] - known.shape[1]
        prefix, x = x[:, :encoder_prefix], x[:, encoder_prefix:]
        full = self.mask_token.to(x.dtype).expand(b, dec_pos.shape[1], d).clone()
        full.scatter_(1, known.unsqueeze(-1).expand(-1, -1, d), x)
        x = full + dec_pos
        if text_rows is not None:
            prefix = torch.cat([text_rows.to(x.dtype), prefix], dim=1)
        if prefix.shape[1]:
            x = torch.cat([prefix, x], dim=1)
            predict = predict + prefix.shape[1]
        blocks = list(self.decoder_blocks)
        for block in blocks[:-1]:
            x = block(x)
        x = blocks[-1](x, predict) if blocks else gather_rows(x, predict)
        return self.decoder_norm(x)

    def text_decode(self, x, predict, last_pos, kv):
        x = self.last_embed(x) + gather_rows(last_pos.expand(x.shape[0], -1, -1), predict)
        for i, block in enumerate(self.cross_attn_blocks):
            x = block(x, kv[2 * i], kv[2 * i + 1])
        return self.cross_norm(x)

    def forward_step(self, tokens, known, predict, context) -> torch.Tensor:
        """One transformer pass of a sampling step: z [B', n, X] for the predicted positions."""
        enc_pos, dec_pos, last_pos, *rest = context
        text_rows, rest = (rest[0], rest[1:]) if self.config.decoder_text else (None, rest)
        encoder_rows, kv = (rest[0], rest[1:]) if self.config.encoder_text else (None, rest)
        x = self.decode(self.encode(tokens, known, enc_pos, encoder_rows), known, predict, dec_pos, text_rows)
        return self.text_decode(x, predict, last_pos, kv)
