"""CTF's two transformers and its cluster map (coarse-to-fine token prediction, arXiv 2503.16194;
the paper's code is not public, so the layout here is the engine's own, built from ELM's blocks).

  stage1  CoarseAR = engine.models.elm.ELMTransformer over the cluster labels (token_each 1,
          vocabulary num_clusters): causal, RoPE-2D, RMSNorm, SwiGLU, class position first,
          KV-cached prefill / decode exactly as ELM's AR model.
  stage2  FineBidirectional: the same block structure without the causal mask. Input: the class
          position + one coarse-label embedding per token; output: per token, one head per
          sub-token over 2 ** code_dim values (the fine label = the codebook index, split into
          ELM-style sub-tokens). One pass predicts every fine label.
  cluster_of [V] int64: the coarse label of each codebook index v (V = 2 ** (token_each *
          code_dim)); v's sub-tokens are its code_dim-bit groups, most significant first, so the
          bits of v read MSB-first are the BAE latent bits of that position (engine.decoders.bae).

State-dict keys: `stage1.*` (ELM AR names), `stage2.*` (the same names, `tok_embedder` embedding
coarse labels), `cluster_of`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .elm import ELMTransformer, LabelEmbedder, RMSNorm, TransformerBlock, rope_table_2d


@dataclass(frozen=True)
class StageShape:
    """What the ELM blocks read of a configuration, for one CTF stage."""
    dim: int
    n_layer: int
    n_head: int
    kv_heads: int
    hidden_dim: int
    norm_eps: float
    rope_base: float
    vocab_size: int      # stage 1: num_clusters; stage 2: 2 ** code_dim (per sub-token)
    token_each: int      # stage 1: 1; stage 2: the sub-tokens per position
    class_rows: int
    block_size: int
    num_clusters: int
    cls_token_num: int = 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid(self) -> int:
        return math.isqrt(self.block_size)


def bidirectional_block(layer: TransformerBlock, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """An ELM block with full (non-causal) self-attention: every position sees every other."""
    attn = layer.attention
    q, k, v = attn.qkv(layer.attention_norm(x), freqs)
    groups = attn.n_head // attn.n_kv_head
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    h = x + attn.out(F.scaled_dot_product_attention(q, k, v))
    return h + layer.feed_forward(layer.ffn_norm(h))


class FineBidirectional(nn.Module):
    """Stage 2: coarse labels [B, L] + class [B] -> fine sub-token logits [B, L, token_each, 2^code_dim]."""

    def __init__(self, shape: StageShape):
        super().__init__()
        c = self.config = shape
        self.token_each = c.token_each
        self.cls_embedding = LabelEmbedder(c.class_rows, c.dim)
        self.tok_embedder = nn.Embedding(c.num_clusters, c.dim)
        self.layers = nn.ModuleList(TransformerBlock(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        if c.token_each > 1:
            self.output = nn.ModuleList(nn.Linear(c.dim, c.vocab_size, bias=False) for _ in range(c.token_each))
        else:
            self.output = nn.Linear(c.dim, c.vocab_size, bias=False)
        # ELM's table: the class position has all-zero rotation rows (its q and k are zero).
        self.register_buffer("freqs_cis", rope_table_2d(c.grid, c.head_dim, c.rope_base, c.cls_token_num),
                             persistent=False)

    def forward(self, coarse: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.cls_embedding.embedding_table(labels).unsqueeze(1), self.tok_embedder(coarse)], dim=1)
        freqs = self.freqs_cis[: h.shape[1]]
        for layer in self.layers:
            h = bidirectional_block(layer, h, freqs)
        h = self.norm(h[:, 1:])
        if self.token_each == 1:
            return self.output(h).float().unsqueeze(2)
        return torch.stack([head(h).float() for head in self.output], dim=2)


class CTFModule(nn.Module):
    """Both stages and the cluster map, for `engine.families.ctf.CTFConfig`."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.stage1 = ELMTransformer(config.stage1_shape())
        self.stage2 = FineBidirectional(config.stage2_shape())
        self.register_buffer("cluster_of", torch.zeros(config.codebook_size, dtype=torch.int64))

    @property
    def device(self) -> torch.device:
        return self.stage1.device


# Codes, sub-tokens and clusters ------------------------------------------------------------------
def codes_to_subtokens(codes: torch.Tensor, token_each: int, code_dim: int) -> torch.Tensor:
    """Codebook indices [...] -> sub-tokens [..., token_each], most significant group first."""
    shifts = code_dim * torch.arange(token_each - 1, -1, -1, device=codes.device)
    return (codes.unsqueeze(-1) >> shifts) & ((1 << code_dim) - 1)


def subtokens_to_codes(sub: torch.Tensor, code_dim: int) -> torch.Tensor:
    """Sub-tokens [..., token_each] -> codebook indices [...] (inverse of codes_to_subtokens)."""
    token_each = sub.shape[-1]
    shifts = code_dim * torch.arange(token_each - 1, -1, -1, device=sub.device)
    return (sub.long() << shifts).sum(-1)


def member_tables(cluster_of: torch.Tensor, num_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(members [K, M] int64, valid [K, M] bool): cluster c's codes in increasing order, padded
    (with code 0, invalid) to the largest cluster's size M. Computed once per model."""
    cluster_of = cluster_of.long()
    v = cluster_of.shape[0]
    order = torch.argsort(cluster_of * v + torch.arange(v, device=cluster_of.device))
    counts = torch.bincount(cluster_of, minlength=num_clusters)
    width = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(width, device=cluster_of.device)
    valid = slot[None, :] < counts[:, None]
    index = (starts[:, None] + slot[None, :]).clamp_max(v - 1)
    members = torch.where(valid, order[index], torch.zeros_like(index))
    return members, valid


def canonical_labels(assignment: np.ndarray) -> np.ndarray:
    """Relabel clusters by first appearance over increasing codes (cluster 0 holds code 0, ...):
    the same partition always gives the same map, whatever numbering k-means chose."""
    _, first, inverse = np.unique(assignment, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first, kind="stable"), kind="stable")
    return rank[inverse.reshape(-1)].astype(np.int64)


def kmeans_cluster_map(codewords, num_clusters: int, seed: int = 0, n_init: int = 4,
                       max_iter: int = 300) -> torch.Tensor:
    """cluster_of [V] int64 from codeword embeddings [V, D] by k-means (the paper's clustering),
    scikit-learn's KMeans with a fixed seed, labels made canonical. Every cluster is non-empty
    (KMeans relocates empty clusters); V must be >= num_clusters."""
    from sklearn.cluster import KMeans

    x = torch.as_tensor(codewords).detach().to("cpu", torch.float64).numpy()
    if x.ndim != 2 or x.shape[0] < num_clusters:
        raise ValueError(f"k-means needs codewords [V, D] with V >= num_clusters = {num_clusters}, "
                         f"got shape {list(x.shape)}")
    km = KMeans(n_clusters=num_clusters, n_init=n_init, max_iter=max_iter, random_state=seed)
    assignment = km.fit_predict(x)
    return torch.from_numpy(canonical_labels(assignment))


def bae_codewords(quantize_weight: torch.Tensor, token_each: int, code_dim: int) -> torch.Tensor:
    """The codeword of every codebook index of a BAE position: its K = token_each * code_dim bits
    (MSB-first, as engine.decoders.bae.indices_to_bits reads sub-tokens) times the BAE's
    quantize.embed.weight [K, emb_dim] -> [2 ** K, emb_dim] float32."""
    bits = token_each * code_dim
    if quantize_weight.shape[0] != bits:
        raise ValueError(f"quantize.embed.weight has {quantize_weight.shape[0]} rows, expected "
                         f"token_each * code_dim = {bits}")
    codes = torch.arange(2 ** bits)
    weights = 2 ** torch.arange(bits - 1, -1, -1)
    bit_vectors = ((codes[:, None] & weights) != 0).float()
    return bit_vectors @ quantize_weight.detach().float().cpu()
