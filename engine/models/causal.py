"""The continuous causal AR transformer (MAR paper's "AR" baseline, Fluid's raster variant): a
pre-norm transformer over the tokens in a fixed order with causal attention, whose output at each
sequence position conditions the diffusion head for the next token. No public checkpoint exists;
the parameter names below are the engine format's.

Sequence layout for a generation order `order` (a permutation of the L token positions; raster
0..L-1 by default), S = L sequence positions:
  s = 0      the start position: the class embedding (or `fake_latent`, the CFG null class)
  s = 1..L-1 the token generated at step s-1, i.e. the token at position order[s-1], through `z_proj`
and every input row s also gets two learned embeddings: the position it holds
(`pos_embed_learned`, row 0 the start, row p + 1 token position p) and the position predicted
from it, order[s] (`target_pos_embed_learned`). The target embedding is what makes any fixed
permutation work: the transformer knows which token it is asked for. The output z at s conditions
the diffusion head for the token at order[s]. The last token is never fed back.

Three ways to run it, equal up to float32 rounding:
  forward(start, tokens, order)             teacher forcing over the whole sequence (training)
  prefill(start, seq_pos, cache)            the start position into a static KV cache, its z
  decode(tokens, input_pos, cache, seq_pos) one fed token at sequence position input_pos, its z
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.head import DiffLoss
from .kv_cache import StaticKVCache, decode_attention, prefill_attention
from .mar import LN_EPS, Block, Linear, pack_blocks, unpatchify


class CausalBlock(Block):
    """MAR's pre-norm block (same keys: norm1, attn.qkv, attn.proj, norm2, mlp.fc1/fc2) with causal
    attention, over a whole sequence or against a static KV cache."""

    def _qkv(self, h: torch.Tensor):
        b, s, dim = h.shape
        heads = self.attn.num_heads
        q, k, v = self.attn.qkv(h).reshape(b, s, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        return q, k, v                                   # each [B, H, S, hd]

    def _finish(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        b, _, s, _ = o.shape
        x = x + self.attn.proj(o.transpose(1, 2).reshape(b, s, -1))
        return x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(self.norm1(x))
        return self._finish(x, F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def cached(self, x, cache: StaticKVCache, layer: int, input_pos: torch.Tensor | None = None):
        """Prefill (positions 0..S-1, input_pos None) or one-position decode at `input_pos` [1]."""
        q, k, v = self._qkv(self.norm1(x))
        if input_pos is None:
            o = prefill_attention(q, k, v, cache, layer)
        else:
            o = decode_attention(q, k, v, cache, layer, input_pos)
        return self._finish(x, o)


class CausalAR(nn.Module):
    """Class-conditional continuous causal AR + MAR's diffusion head (`diffloss.net.*`)."""

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        d, length = c.embed_dim, c.seq_len
        self.class_emb = nn.Embedding(c.class_num, d)
        self.fake_latent = nn.Parameter(torch.zeros(1, d))
        self.z_proj = Linear(c.token_dim, d)
        self.z_proj_ln = nn.LayerNorm(d, eps=LN_EPS)
        self.pos_embed_learned = nn.Parameter(torch.zeros(1, length + 1, d))
        self.target_pos_embed_learned = nn.Parameter(torch.zeros(1, length, d))
        self.blocks = nn.ModuleList(CausalBlock(d, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        self.diffloss = DiffLoss(c.token_dim, d, c.diffloss_w, c.diffloss_d)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def pack_linears(self, dtype: torch.dtype | None) -> None:
        """Reorder the blocks' weights for oneDNN in `dtype`, or drop them (see mar.Linear)."""
        pack_blocks(self.blocks, None, dtype, (self.z_proj,))

    def grid(self) -> tuple[int, int]:
        return (self.config.seq_h, self.config.seq_h)

    def unpatchify(self, tokens: torch.Tensor, grid=None) -> torch.Tensor:
        """[B, L, C] tokens in position order -> [B, vae_embed_dim, H, W]."""
        return unpatchify(tokens, self.config.patch_size, self.config.vae_embed_dim, self.config.seq_h)

    # Pieces ---------------------------------------------------------------------------------
    def class_embedding(self, labels: torch.Tensor | None, bsz: int, cfg: bool) -> torch.Tensor:
        """Start rows [B', D]: the class rows (fake_latent without labels), then with CFG the
        null half (fake_latent), as MAR's class embedding."""
        fake = self.fake_latent.expand(bsz, -1)
        cond = fake if labels is None else self.class_emb(labels)
        return torch.cat([cond, fake]) if cfg else cond

    def position_table(self, order: torch.Tensor) -> torch.Tensor:
        """[L, D]: what sequence position s adds to its input, the embedding of the position it
        holds plus that of the position it predicts (order[s]). Computed once per call."""
        held = torch.cat([order.new_zeros(1), order[:-1] + 1])
        return (self.pos_embed_learned[0].index_select(0, held)
                + self.target_pos_embed_learned[0].index_select(0, order))

    def new_cache(self, batch: int, dtype=torch.float32) -> StaticKVCache:
        c = self.config
        return StaticKVCache(c.depth, batch, c.num_heads, c.seq_len, c.embed_dim // c.num_heads,
                             dtype, self.device)

    # The three passes -------------------------------------------------------------------------
    def forward(self, start: torch.Tensor, tokens: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: start rows [B, D], tokens [B, L, C] in position order, order [L].
        Returns z [B, L, D]; z[:, s] conditions the token at position order[s]."""
        fed = tokens.index_select(1, order[:-1])
        x = torch.cat([start.unsqueeze(1), self.z_proj(fed)], dim=1) + self.position_table(order)
        x = self.z_proj_ln(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def prefill(self, start: torch.Tensor, seq_pos: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """The start rows [B, D] at sequence position 0 into the cache; z [B, D] of order[0]."""
        x = self.z_proj_ln(start.unsqueeze(1) + seq_pos[:1])
        for i, block in enumerate(self.blocks):
            x = block.cached(x, cache, i)
        return self.norm(x)[:, 0]

    def decode(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache: StaticKVCache,
               seq_pos: torch.Tensor) -> torch.Tensor:
        """tokens [B, C] fed at sequence position input_pos ([1] int64 tensor, or [B]: one per
        row): its keys and values go into the cache; returns z [B, D] of the token at
        order[input_pos]. Fixed shapes."""
        x = self.z_proj(tokens).unsqueeze(1) + seq_pos.index_select(0, input_pos).unsqueeze(-2)
        x = self.z_proj_ln(x)
        for i, block in enumerate(self.blocks):
            x = block.cached(x, cache, i, input_pos)
        return self.norm(x)[:, 0]
