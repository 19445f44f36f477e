"""The MAR transformer (encoder over buffer + known tokens, decoder over the full sequence),
inference only, state-dict compatible with the published `MAR` module."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import packed_linear
from ..ops.attention import attention, native_available as native_attention_available
from ..core.config import MARConfig
from ..core.errors import SamplingError
from ..ops.head import DiffLoss

LN_EPS = 1e-6


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[n, c, h*p, w*p] -> [n, h*w, c*p*p], channel outermost inside a token."""
    n, c, hp, wp = x.shape
    h, w = hp // p, wp // p
    x = x.reshape(n, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, h * w, c * p * p)


def unpatchify(x: torch.Tensor, p: int, c: int, h: int, w: int | None = None) -> torch.Tensor:
    """Inverse of `patchify` for a grid of h x w tokens (square by default)."""
    n, w = x.shape[0], h if w is None else w
    x = x.reshape(n, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, c, h * p, w * p)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) that can also hold row ranges of its
    weight packed once for the CPU (engine.ops.packed_linear): float32 on MKL's packed sgemm on Intel
    CPUs (oneDNN elsewhere or without the native extension), equal to F.linear up to summation
    order; bfloat16 (precision="bf16", under CPU autocast) on oneDNN, the same product as
    autocast's F.linear without its per-call weight reorder (1.2-5.7x at MAR-B's shapes), where
    this CPU's oneDNN has bf16 kernels, else widened (oneDNN's float32 product of the bf16 values,
    rounded to bf16: ~5x autocast's bf16 F.linear on AVX2). MARModel packs the blocks (and the
    token and width projections) for the native CPU backend; everything else uses F.linear."""

    packs: dict | None = None  # {(start, stop): (kind, packed weight rows start:stop, bias rows)}
    pack_dtype: torch.dtype | None = None

    def pack(self, ranges=((0, None),), dtype: torch.dtype = torch.float32) -> None:
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"Linear.pack: float32 or bfloat16, got {dtype}")
        packs = {}
        for a, b in ranges:
            packed = packed_linear.pack(self.weight[a:b], None if self.bias is None
                                        else self.bias[a:b], dtype)
            if packed is not None:   # else this CPU has no packed path for dtype: F.linear
                packs[(a, b)] = packed
        self.packs, self.pack_dtype = packs, dtype

    def unpack(self) -> None:
        self.packs = self.pack_dtype = None

    def rows(self, x: torch.Tensor, start: int = 0, stop: int | None = None,
             gelu: bool = False) -> torch.Tensor:
        """x @ weight[start:stop].T + bias[start:stop], with `gelu` then exact (erf) GELU: on a
        oneDNN pack as the product's post-op (its float32 sums, before any bf16 rounding)."""
        packed = None if self.packs is None or x.device.type != "cpu" else self.packs.get((start, stop))
        if packed is not None:
            kind, weight, bias = packed
            autocast = torch.is_autocast_enabled("cpu")
            if self.pack_dtype == torch.float32 and x.dtype == torch.float32 and not autocast:
                return packed_linear.run(kind, x, weight, bias, gelu)
            if self.pack_dtype == torch.bfloat16 and autocast and \
                    torch.get_autocast_dtype("cpu") == torch.bfloat16:   # what autocast would compute
                return packed_linear.run(kind, x.to(torch.bfloat16), weight, bias, gelu)
        bias = None if self.bias is None else self.bias[start:stop]
        h = F.linear(x, self.weight[start:stop], bias)
        if not gelu:
            return h
        # In place when no gradient needs h (sampling): the same values, one large buffer fewer.
        return torch.ops.aten.gelu_(h) if not (torch.is_grad_enabled() and h.requires_grad) else F.gelu(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows(x)


class AttentionBase(nn.Module):
    """An attention layer whose score-softmax-value product can run on the native CPU kernel
    (engine.ops.attention); pack_blocks turns it on with the packed linears."""

    use_native_kernel = False


class Attention(AttentionBase):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, query_index: torch.Tensor | None = None) -> torch.Tensor:
        """Bidirectional attention; with `query_index [B, n]` only those rows are computed."""
        b, length, dim = x.shape
        hd = dim // self.num_heads
        if query_index is None:
            q, k, v = self.qkv(x).reshape(b, length, 3, self.num_heads, hd).permute(2, 0, 3, 1, 4)
        else:
            k, v = self.qkv.rows(x, dim).reshape(b, length, 2, self.num_heads, hd).permute(2, 0, 3, 1, 4)
            rows = torch.gather(x, 1, query_index.unsqueeze(-1).expand(-1, -1, dim))
            q = self.qkv.rows(rows, 0, dim).reshape(b, -1, self.num_heads, hd).transpose(1, 2)
        out = attention(q, k, v, native=self.use_native_kernel)
        return self.proj(out.transpose(1, 2).reshape(b, -1, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.fc1.rows(x, gelu=True))


class Block(nn.Module):
    """Pre-norm ViT block (timm `Block` key layout)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float = LN_EPS):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, query_index: torch.Tensor | None = None) -> torch.Tensor:
        """With `query_index`, returns only those rows: exact, and the last decoder block
        needs nothing else."""
        h = self.norm1(x)
        if query_index is not None:
            x = torch.gather(x, 1, query_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = x + self.attn(h, query_index)
        return x + self.mlp(self.norm2(x))


def pack_blocks(blocks, rows_block, dtype: torch.dtype | None, linears=()) -> None:
    """Pack every engine `Linear` of `blocks` for oneDNN in `dtype` (None: drop the packs), each
    as it is used: the block that attends from a subset of rows (`rows_block`) has its q and kv
    products apart. Their attention layers then use the native CPU kernel where it is built.
    `linears`: the model's other per-step `Linear`s (token and width projections), packed whole
    (under bf16 autocast on an AVX2 CPU unpacked ones ran at a fifth of the float32 rate)."""
    for module in linears:
        module.pack(dtype=dtype) if dtype is not None else module.unpack()
    native_kernel = dtype is not None and native_attention_available()
    for block in blocks:
        for module in block.modules():
            if isinstance(module, AttentionBase):
                module.use_native_kernel = native_kernel
            if isinstance(module, Linear):
                ranges = ((0, None),)
                if block is rows_block and module is block.attn.qkv:
                    d = block.attn.proj.in_features
                    ranges = ((0, d), (d, None))
                module.pack(ranges, dtype) if dtype is not None else module.unpack()


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class MAR(nn.Module):
    """MAR encoder/decoder and diffusion head. Parameter names follow the published module."""

    def __init__(self, config: MARConfig):
        super().__init__()
        self.config = config
        c = config
        e, d, buf, length = c.encoder_embed_dim, c.decoder_embed_dim, c.buffer_size, c.seq_len
        self.class_emb = nn.Embedding(c.class_num, e)
        self.fake_latent = nn.Parameter(torch.zeros(1, e))
        self.z_proj = Linear(c.token_dim, e)
        self.z_proj_ln = nn.LayerNorm(e, eps=LN_EPS)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, length + buf, e))
        self.encoder_blocks = nn.ModuleList(
            Block(e, c.encoder_num_heads, c.mlp_ratio) for _ in range(c.encoder_depth))
        self.encoder_norm = nn.LayerNorm(e, eps=LN_EPS)
        self.decoder_embed = Linear(e, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, length + buf, d))
        self.decoder_blocks = nn.ModuleList(
            Block(d, c.decoder_num_heads, c.mlp_ratio) for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, length, d))
        self.diffloss = DiffLoss(c.token_dim, d, c.diffloss_w, c.diffloss_d)

    def pack_linears(self, dtype: torch.dtype | None) -> None:
        """Reorder the transformer blocks' weights for oneDNN in `dtype` (CPU float32 or
        bfloat16), or drop them (None)."""
        pack_blocks([*self.encoder_blocks, *self.decoder_blocks],
                    self.decoder_blocks[-1] if len(self.decoder_blocks) else None, dtype,
                    (self.z_proj, self.decoder_embed))

    # The family interface (see engine/families): grid, step context, step, unpatchify.
    def grid(self) -> tuple[int, int]:
        return (self.config.seq_h, self.config.seq_h)

    def class_embedding(self, labels: torch.Tensor | None, bsz: int, cfg: bool) -> torch.Tensor:
        """[B', E]: class rows (fake_latent without labels), then with CFG the unconditional half."""
        fake = self.fake_latent.expand(bsz, -1)
        cond = fake if labels is None else self.class_emb(labels)
        return torch.cat([cond, fake]) if cfg else cond

    def step_context(self, condition, bsz: int, use_cfg: bool, grid) -> tuple[torch.Tensor, ...]:
        """What every step of a call reads besides tokens: the class-embedding rows [B', E]."""
        if condition.kind not in ("class", "none"):
            raise SamplingError(f"MAR is class-conditional; got a {condition.kind!r} condition")
        return (self.class_embedding(condition.value, bsz, use_cfg),)

    def unpatchify(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        return unpatchify(tokens, self.config.patch_size, self.config.vae_embed_dim, grid[0])

    def encode(self, tokens: torch.Tensor, known: torch.Tensor, class_emb: torch.Tensor):
        """Encoder over the buffer rows and the known tokens `known [B, k]` (sorted positions)."""
        buf = self.config.buffer_size
        b, e = class_emb.shape
        pos = self.encoder_pos_embed_learned
        buffer_rows = class_emb.unsqueeze(1) + pos[:, :buf]
        known_rows = self.z_proj(gather_rows(tokens, known)) + gather_rows(pos[:, buf:].expand(b, -1, -1), known)
        x = self.z_proj_ln(torch.cat([buffer_rows, known_rows], dim=1))
        for block in self.encoder_blocks:
            x = block(x)
        return self.encoder_norm(x)

    # fast="lazy" (LazyMAR's token redundancy): the encoder over the rows that changed -------------
    def new_encoder_cache(self, bsz: int, device, dtype=torch.float32) -> dict:
        """Static buffers of one call: every encoder layer's keys and values [B, H, buf + L, hd]
        and the encoder's output rows [B, buf + L, E], by row (buffer rows, then positions)."""
        c = self.config
        rows, e = c.buffer_size + c.seq_len, c.encoder_embed_dim
        heads = c.encoder_num_heads
        shape = (len(self.encoder_blocks), bsz, heads, rows, e // heads)
        return {"k": torch.zeros(shape, device=device, dtype=dtype), "v": torch.zeros(shape, device=device, dtype=dtype),
                "out": torch.zeros(bsz, rows, e, device=device, dtype=dtype)}

    def encode_cached(self, tokens: torch.Tensor, known: torch.Tensor, new: torch.Tensor,
                      class_emb: torch.Tensor, cache: dict) -> torch.Tensor:
        """LazyMAR's encoder: only the buffer rows and the tokens `new [B, m]` (those that became
        known since the cache was written; all of `known` to fill it) are computed, their keys,
        values and outputs written into `cache`; they attend to the cached keys / values of every
        known row. Returns the encoder output of the buffer and `known [B, k]` rows (the others
        from the cache), as `encode` does."""
        buf = self.config.buffer_size
        b, e = class_emb.shape
        pos = self.encoder_pos_embed_learned
        buffer_rows = class_emb.unsqueeze(1) + pos[:, :buf]
        new_rows = self.z_proj(gather_rows(tokens, new)) + gather_rows(pos[:, buf:].expand(b, -1, -1), new)
        x = self.z_proj_ln(torch.cat([buffer_rows, new_rows], dim=1))
        first = torch.arange(buf, device=known.device).expand(b, -1)
        rows = torch.cat([first, new + buf], dim=1)
        keys = torch.cat([first, known + buf], dim=1)
        for i, block in enumerate(self.encoder_blocks):
            attn = block.attn
            heads = attn.num_heads
            hd = e // heads
            q, k, v = attn.qkv(block.norm1(x)).reshape(b, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
            index = rows[:, None, :, None].expand(-1, heads, -1, hd)
            cache["k"][i].scatter_(2, index, k.to(cache["k"].dtype))
            cache["v"][i].scatter_(2, index, v.to(cache["v"].dtype))
            kindex = keys[:, None, :, None].expand(-1, heads, -1, hd)
            keys_i = torch.gather(cache["k"][i], 2, kindex).to(q.dtype)
            values_i = torch.gather(cache["v"][i], 2, kindex).to(q.dtype)
            out = attention(q, keys_i, values_i, native=attn.use_native_kernel)
            x = x + attn.proj(out.transpose(1, 2).reshape(b, -1, e))
            x = x + block.mlp(block.norm2(x))
        x = self.encoder_norm(x)
        cache["out"].scatter_(1, rows.unsqueeze(-1).expand(-1, -1, e), x.to(cache["out"].dtype))
        return gather_rows(cache["out"], keys).to(x.dtype)

    def decode(self, x: torch.Tensor, known: torch.Tensor, predict: torch.Tensor) -> torch.Tensor:
        """Decoder over the full sequence; returns the head conditions of `predict [B, n]` only."""
        buf = self.config.buffer_size
        x = self.decoder_embed(x)
        b, _, d = x.shape
        # In x's type: under bf16/fp16 autocast the decoder embedding's output is low precision.
        full = self.mask_token.to(x.dtype).expand(b, buf + self.config.seq_len, d).clone()
        full[:, :buf] = x[:, :buf]
        full.scatter_(1, (known + buf).unsqueeze(-1).expand(-1, -1, d), x[:, buf:])
        x = full + self.decoder_pos_embed_learned
        rows = predict + buf
        blocks = list(self.decoder_blocks)
        for block in blocks[:-1]:
            x = block(x)
        x = blocks[-1](x, rows) if blocks else gather_rows(x, rows)
        x = self.decoder_norm(x)
        diff_pos = self.diffusion_pos_embed_learned.expand(b, -1, -1)
        return x + gather_rows(diff_pos, predict)

    def forward_step(self, tokens, known, predict, context) -> torch.Tensor:
        """One transformer pass of a sampling step: z [B', n, D] for the predicted positions."""
        (class_emb,) = context
        return self.decode(self.encode(tokens, known, class_emb), known, predict)

    # The published pass, written with a mask: used by tests and by the golden `transformer` case.
    def forward_masked(self, tokens: torch.Tensor, mask: torch.Tensor, class_emb: torch.Tensor):
        """z [B, L, D] for every position, given `mask [B, L]` (1 = unknown, equal counts per row)."""
        b, length = mask.shape
        order = torch.argsort(mask.float(), dim=1, stable=True)  # known first, positions ascending
        num_known = int((mask[0] == 0).sum())
        known = order[:, :num_known]
        everything = torch.arange(length, device=mask.device).expand(b, -1)
        return self.decode(self.encode(tokens, known, class_emb), known, everything)
