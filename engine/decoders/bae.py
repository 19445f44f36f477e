"""ELM's binary-autoencoder decoder (Pepper-lll/LMforImageGeneration `bae/binaryae.py`
`BinaryAutoEncoder`): sub-token indices -> bits -> `quantize.embed` -> `generator` -> images.

How ELM's sample.py decodes: each sub-token index is `code_dim` bits read most-significant first;
a position's `token_each` sub-tokens concatenate to the K = token_each * code_dim bits of the
BAE's latent channel; positions fill the grid row by row. Then
`einsum("b n h w, n d -> b d h w", bits, quantize.embed.weight)` and the generator (conv, ResBlock,
AttnBlock, ResBlock, then ResBlocks and nearest-neighbour Upsamples, GroupNorm(32, eps 1e-6),
conv). Outputs are images in about [0, 1] (sample.py clamps to [0, 1]).

`load_bae(path)` reads `binaryae_ema.th` (ELM's checkpoints hold a BinaryGAN state dict whose
autoencoder keys carry an `ae.` prefix, which ELM's `load_pretrain` strips, keeping those keys
only; a bare BinaryAutoEncoder state dict works too) with `torch.load(weights_only=True)`. The
generator's layout (channels, blocks, upsamplings) is read from its keys, so no hyper-parameters
are needed; the encoder, the quantizer's projection and `generator.logsigma` (used for ELBO
estimates, not decoding) are not loaded.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import CheckpointError, SamplingError
from ..core.io import check_dtypes

GROUPS = 32          # ELM's `normalize`: GroupNorm(num_groups=32, eps=1e-6, affine=True)
NORM_EPS = 1e-6
MAX_BLOCKS = 1024
MAX_CHANNELS = 16384


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=NORM_EPS, affine=True)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.c_in, self.c_out = c_in, c_out
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_out = nn.Conv2d(c_in, c_out, 1)   # present in every block, used when c_in != c_out

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return h + (self.conv_out(x) if self.c_in != self.c_out else x)


class AttnBlock(nn.Module):
    """Single-head self-attention over the feature map (1x1 convolutions for q, k, v, out)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)
        k = self.k(h).reshape(b, c, hh * ww)
        weights = F.softmax(torch.bmm(q, k) * (int(c) ** -0.5), dim=2)
        out = torch.bmm(self.v(h).reshape(b, c, hh * ww), weights.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Quantize(nn.Module):
    def __init__(self, bits: int, emb_dim: int):
        super().__init__()
        self.embed = nn.Embedding(bits, emb_dim)


class Generator(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class BAEDecoder(nn.Module):
    """The decoding half of ELM's BinaryAutoEncoder, built from its state dict."""

    def __init__(self, bits: int, emb_dim: int, blocks):
        super().__init__()
        self.bits, self.emb_dim = bits, emb_dim
        self.quantize = Quantize(bits, emb_dim)
        self.generator = Generator(blocks)
        self.upsamplings = sum(isinstance(b, Upsample) for b in blocks)
        self.out_channels = blocks[-1].weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.quantize.embed.weight.device

    def decode_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """bits [B, K, h, w] (0/1 floats) -> images [B, C, h * 2^u, w * 2^u]."""
        quant = torch.einsum("b n h w, n d -> b d h w", bits, self.quantize.embed.weight)
        return self.generator(quant)

    def indices_to_bits(self, indices: torch.Tensor) -> torch.Tensor:
        """Sub-token indices [B, L, token_each] (L = h * h, row-major) -> bits [B, K, h, h]."""
        if not isinstance(indices, torch.Tensor) or indices.ndim != 3 or indices.is_floating_point():
            raise SamplingError("BAE decoding takes integer sub-token indices [B, positions, token_each]")
        b, length, token_each = indices.shape
        side = int(round(length ** 0.5))
        if side * side != length or self.bits % token_each:
            raise SamplingError(f"cannot decode [{b}, {length}, {token_each}] indices with this BAE: it needs a "
                                f"square grid of positions and token_each dividing its {self.bits} bits")
        code_dim = self.bits // token_each
        indices = indices.to(self.device, torch.int64)
        if int(indices.min()) < 0 or int(indices.max()) >= 2 ** code_dim:
            raise SamplingError(f"sub-token indices must be in 0..{2 ** code_dim - 1} (code_dim {code_dim})")
        weights = 2 ** torch.arange(code_dim - 1, -1, -1, device=self.device)      # most significant first
        bits = ((indices[..., None] & weights) != 0).float()                        # [B, L, T, code_dim]
        return bits.reshape(b, length, self.bits).permute(0, 2, 1).reshape(b, self.bits, side, side)

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """ELM tokens [B, L, token_each] -> images [B, C, H, W] (about [0, 1], not clamped)."""
        return self.decode_bits(self.indices_to_bits(indices))

    def forward(self, indices):
        return self.decode_indices(indices)


def _shape(state, key):
    t = state.get(key)
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def build_decoder(state: dict, source: str) -> BAEDecoder:
    """A BAEDecoder whose generator layout is read from `state` (a BinaryAutoEncoder state dict)."""
    embed = _shape(state, "quantize.embed.weight")
    if embed is None or len(embed) != 2:
        raise CheckpointError(f"{source}: not a binary autoencoder checkpoint (no quantize.embed.weight; "
                              f"found e.g. {sorted(state)[:5]})")
    pattern = re.compile(r"generator\.blocks\.(\d+)\.")
    count = max((int(m.group(1)) + 1 for k in state if (m := pattern.match(k))), default=0)
    if not 2 <= count <= MAX_BLOCKS:
        raise CheckpointError(f"{source}: expected 2..{MAX_BLOCKS} generator.blocks, found {count}")
    with torch.device("meta"):   # shapes only; the weights are assigned from `state` below
        decoder = _build(state, source, embed, count)
    wanted = decoder.state_dict()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} missing keys, e.g. {missing[:5]}")
    for key, value in wanted.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{source}: {key} has shape {list(state[key].shape)}, expected {list(value.shape)}")
    check_dtypes({k: state[k] for k in wanted}, source)
    decoder.load_state_dict({k: state[k].float() for k in wanted}, assign=True)
    return decoder.eval().requires_grad_(False)


def _build(state: dict, source: str, embed: tuple, count: int) -> BAEDecoder:
    blocks, channels = [], embed[1]
    for i in range(count):
        p = f"generator.blocks.{i}."
        conv1, q, up, w = (_shape(state, p + name) for name in ("conv1.weight", "q.weight", "conv.weight", "weight"))
        if conv1:
            kind, c_in, c_out, normed = ResBlock, conv1[1], conv1[0], (conv1[1], conv1[0])
        elif q:
            kind, c_in, c_out, normed = AttnBlock, q[0], q[0], (q[0],)
        elif up:
            kind, c_in, c_out, normed = Upsample, up[0], up[0], ()
        elif w and len(w) == 4 and w[2] == w[3] and w[2] % 2 == 1:
            kind, c_in, c_out, normed = nn.Conv2d, w[1], w[0], ()
        elif w and len(w) == 1:
            kind, c_in, c_out, normed = _norm, w[0], w[0], (w[0],)
        else:
            raise CheckpointError(f"{source}: cannot tell what generator block {i} is (keys {p}*)")
        if c_in != channels or not 1 <= c_out <= MAX_CHANNELS:
            raise CheckpointError(f"{source}: generator block {i} takes {c_in} channels but receives {channels}")
        if any(n % GROUPS for n in normed):
            raise CheckpointError(f"{source}: generator block {i} normalises {normed} channels, not multiples "
                                  f"of the {GROUPS} groups of ELM's GroupNorm")
        if kind is nn.Conv2d:
            blocks.append(nn.Conv2d(c_in, c_out, w[2], padding=w[2] // 2))
        elif kind is ResBlock:
            blocks.append(ResBlock(c_in, c_out))
        else:
            blocks.append(kind(c_in))
        channels = c_out
    if not isinstance(blocks[-1], nn.Conv2d):
        raise CheckpointError(f"{source}: the generator's last block is not the output convolution")
    return BAEDecoder(embed[0], embed[1], blocks)


def _read_safetensors(path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None


def load_bae(path, device="cpu") -> BAEDecoder:
    """ELM's BAE decoder from `binaryae_ema.th` (weights-only load), a `.safetensors` file of the
    same keys, or an engine BAE directory holding `bae.safetensors` (engine/builtin/assets/digits-bae);
    clear CheckpointError on a missing, unreadable or foreign file."""
    import os
    from pathlib import Path

    from ..core.io import check_finite, read_torch_file

    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"expected a path to binaryae_ema.th, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir() and (path / "bae.safetensors").exists():   # an engine BAE directory (digits-bae)
        path = path / "bae.safetensors"
    ckpt = _read_safetensors(path) if path.suffix == ".safetensors" else read_torch_file(path)
    if not isinstance(ckpt, dict) or not ckpt:
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a BAE state dict")
    if any(isinstance(k, str) and k.startswith("ae.") for k in ckpt):
        state = {k.split(".", 1)[1]: v for k, v in ckpt.items() if isinstance(k, str) and k.startswith("ae.")}
    else:
        state = {k.removeprefix("module."): v for k, v in ckpt.items() if isinstance(k, str)}
    if {"model", "model_ema"} & set(state) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is a generator's training checkpoint ('model' / 'model_ema'), "
                              "not a binary autoencoder (ELM's binaryae_ema.th)")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:5]}")
    decoder = build_decoder(state, str(path))
    check_finite(decoder.state_dict(), str(path))
    return decoder.to(device)
