"""ELM's class-conditional masked transformer (Pepper-lll/LMforImageGeneration `llama/mlm_model.py`
`Transformer`, MaskGIT-style, over binary-autoencoder sub-tokens), state-dict compatible:
`cls_embedding.embedding_table`, one `tok_embedder` (2**code_dim sub-token values + the mask id
2**code_dim, + one pause row when pause), `pos_embed`, `layers.{i}.attention.{wqkv,wo}`,
`layers.{i}.feed_forward.{w1,w2,w3}`, `layers.{i}.{attention_norm,ffn_norm}`, `norm`,
`mlm_layer.{fc,ln,bias}`, and the weights the published forward never reads: `proj`
(token_each > 1), `output.{i}` (or one `output`) and `pos_embed` (rope2d). They are kept so that
a published state dict loads as it is.

Reproduced as published (the blocks, RMSNorm, SwiGLU and RoPE are engine/models/elm.py's):
  * Every sub-token is its own sequence element: the class embedding repeated token_each times,
    then each position's token_each sub-token embeddings, one shared table (the mask id is a
    row of it): a sequence of (block_size + 1) * token_each vectors.
  * Bidirectional attention (the published all-True boolean mask; without it SDPA gives the
    same values on CPU, checked in the tests).
  * pos_type 'rope2d' (ELM's released setting): 2D RoPE with one all-zero class row, each row
    repeated token_each times: sub-tokens of a position share its rotation and the class copies
    get q = k = 0. With token_each > 1 the sub-tokens of a masked position are then identical
    inputs and get identical logits (the model cannot tell them apart).
    pos_type 'rope1d': 1D RoPE over all (block_size + 1) * token_each elements.
  * Logits: final RMSNorm, then `mlm_layer`: Linear (with bias), exact GELU, LayerNorm, a
    matmul with the token table's transpose plus a bias (in that order: no fused addmm), for
    every sequence element; the class elements and the mask / pause columns are then cut off:
    [B, block_size * token_each, 2**code_dim].

`refine_step` is one step of the published generate_cfg on this transformer (its quirks are
listed in engine/families/elm_mlm.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.categorical import guide, top_k_mask, top_p_mask
from .elm import LabelEmbedder, RMSNorm, TransformerBlock, rope_table_1d, rope_table_2d


class MlmLayer(nn.Module):
    """The published logit head: tied to the token table, which forward() passes in."""

    def __init__(self, dim: int, rows: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.gelu = nn.GELU()
        self.ln = nn.LayerNorm(dim)
        self.bias = nn.Parameter(torch.zeros(1, 1, rows))

    def forward(self, x, table):
        h = self.ln(self.gelu(self.fc(x)))
        return torch.matmul(h, table.transpose(0, 1)) + self.bias


def bidirectional_block(block: TransformerBlock, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """One of engine/models/elm.py's blocks with full (not causal) attention."""
    attn = block.attention
    q, k, v = attn.qkv(block.attention_norm(x), freqs)
    groups = attn.n_head // attn.n_kv_head
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    h = x + attn.out(F.scaled_dot_product_attention(q, k, v))
    return h + block.feed_forward(block.ffn_norm(h))


class ELMMLMTransformer(nn.Module):
    """The published masked `Transformer` for `engine.families.elm_mlm.ELMMLMConfig` (rope2d or
    rope1d, one class token: the configurations that run)."""

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        self.token_each, self.vocab_size, self.mask_id = c.token_each, c.vocab_size, c.mask_id
        rows = c.embedding_rows
        self.cls_embedding = LabelEmbedder(c.class_rows, c.dim)
        self.tok_embedder = nn.Embedding(rows, c.dim)
        self.pos_embed = nn.Embedding(c.block_size, c.dim)          # unused with rope2d (as published)
        self.layers = nn.ModuleList(TransformerBlock(c) for _ in range(c.n_layer))
        if c.token_each > 1:
            self.proj = nn.Linear(c.token_each * c.dim, c.dim, bias=False)      # unused (as published)
            self.output = nn.ModuleList(nn.Linear(c.dim, rows, bias=False) for _ in range(c.token_each))
        else:
            self.output = nn.Linear(c.dim, rows, bias=False)                   # unused (as published)
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.mlm_layer = MlmLayer(c.dim, rows)
        # The published tables, on the CPU even when built on the meta device. rope2d: one row
        # per position, repeated for its token_each sub-tokens (what apply_rotary_emb does on
        # every call), the class row zero; rope1d: one angle per sequence element, class copies
        # included, so a masked position's sub-tokens differ (under rope2d they are identical
        # inputs and get identical logits).
        if c.pos_type == "rope1d":
            table = rope_table_1d((c.block_size + 1) * c.token_each, c.head_dim, c.rope_base)
        else:
            table = rope_table_2d(c.grid, c.head_dim, c.rope_base, 1).repeat_interleave(c.token_each, dim=0)
        self.register_buffer("freqs_cis", table, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def embed(self, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """idx [B, S, token_each] (mask id where unknown), labels [B] -> [B, (S + 1) * token_each, dim]."""
        t = self.token_each
        cls = self.cls_embedding.embedding_table(labels).unsqueeze(1)        # [B, 1, dim]
        cls = cls.repeat_interleave(t, dim=1).unsqueeze(1)                   # [B, 1, T, dim]
        h = torch.cat([cls, self.tok_embedder(idx)], dim=1)                  # [B, S + 1, T, dim]
        return h.reshape(idx.shape[0], -1, h.shape[-1])

    def forward(self, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Published `Transformer.forward(idx, cond, token_all_mask)` at inference: logits
        [B, S * token_each, 2**code_dim] of every sub-token of idx [B, S, token_each]."""
        h = self.embed(idx, labels)
        freqs = self.freqs_cis[: h.shape[1]]
        for layer in self.layers:
            h = bidirectional_block(layer, h, freqs)
        logits = self.mlm_layer(self.norm(h), self.tok_embedder.weight)
        return logits[:, self.token_each:, : self.vocab_size]


def refine_step(module, tokens, rows, scale, draw_noise, confidence_noise, mask_floor, remask_on,
                shared_count: bool, top_k=None, top_p=None):
    """One graph-safe MaskGIT step of fixed shapes, no host synchronisation.

    tokens [B, S, T] (mask id where unknown); rows: the class labels [B] or [cond; null] [2B]
    (`scale` given: a 0-d or [B] float tensor); draw_noise [B, S * T, V] ~ Exp(1);
    confidence_noise [B, S, T] (Gumbel already times temperature * (1 - ratio)); mask_floor:
    int64 0-d tensor floor(S * mask_ratio); remask_on: bool 0-d tensor or None (no remask);
    shared_count: True takes image 0's unknown count for the batch (published), False each
    image's own. Returns (sampled [B, S, T], next tokens [B, S, T], guided logits [B, S*T, V])."""
    bsz, seq, each = tokens.shape
    mask_id = module.mask_id
    unknown = tokens == mask_id
    logits = module(torch.cat([tokens, tokens]) if scale is not None else tokens, rows)
    if scale is not None:
        logits = guide(logits, scale)
    filtered = logits
    if top_k is not None:
        filtered = top_k_mask(filtered, top_k)
    if top_p is not None and top_p < 1.0:
        filtered = top_p_mask(filtered, top_p)
    # Categorical(logits=...).sample(): normalised logits, softmax, multinomial's exponential race.
    normalised = filtered - filtered.logsumexp(dim=-1, keepdim=True)
    fresh = torch.argmax(torch.softmax(normalised, dim=-1) / draw_noise, dim=-1).view(bsz, seq, each)
    sampled = torch.where(unknown, fresh, tokens)
    probs = torch.softmax(filtered, dim=-1).view(bsz, seq, each, -1)
    chosen = probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    chosen = torch.where(unknown, chosen, float("inf"))
    if remask_on is not None:
        fresh_probs = probs.gather(-1, fresh.unsqueeze(-1)).squeeze(-1)
        chosen = torch.where(remask_on & (fresh != sampled), fresh_probs, chosen)
    confidence = (torch.log(chosen) + confidence_noise).mean(dim=-1)            # [B, S]
    count = unknown[..., 0].sum(dim=-1, keepdim=True)                          # [B, 1]
    if shared_count:
        count = count[:1].expand(bsz, 1)
    mask_len = torch.clamp(torch.minimum(count - 1, mask_floor), min=1)
    cutoff = torch.sort(confidence, dim=-1).values.gather(1, mask_len - 1)
    remasked = (confidence <= cutoff).unsqueeze(-1)
    return sampled, torch.where(remasked, mask_id, sampled), logits
