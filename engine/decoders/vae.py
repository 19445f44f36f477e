"""KL-16 VAE decoder (the latent-diffusion KL autoencoder used by MAR), inference only.

Layout: ``ch=128, ch_mult=(1,1,2,2,4), num_res_blocks=2``, no attention outside the middle block,
``z_channels = embed_dim = 16``. Parameter names follow the published ``AutoencoderKL`` state dict
(``post_quant_conv.*``, ``decoder.*``) so a ``kl16.ckpt`` loads without renaming.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.core.errors import CheckpointError
# Thread-safe weights-only load (argparse.Namespace registered once, never a per-call global
# toggle) and the NaN/Inf check shared with the MAR loader.
from ..core.io import check_dtypes, check_finite, torch_load_weights

MAR_LATENT_SCALE = 0.2325

CH = 128
CH_MULT = (1, 1, 2, 2, 4)
NUM_RES_BLOCKS = 2
Z_CHANNELS = 16
EMBED_DIM = 16
OUT_CHANNELS = 3


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


def _conv3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), _conv3(cin, cout)
        self.norm2, self.conv2 = _norm(cout), _conv3(cout, cout)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # b, hw, c
        h = F.scaled_dot_product_attention(q, k, v)  # scale c**-0.5
        return x + self.proj_out(h.transpose(1, 2).reshape(b, c, hh, ww))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = _conv3(c, c)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    def __init__(self, ch=CH, ch_mult=CH_MULT, num_res_blocks=NUM_RES_BLOCKS,
                 z_channels=Z_CHANNELS, out_ch=OUT_CHANNELS):
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in = _conv3(z_channels, c)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
        levels = []
        for i in reversed(range(len(ch_mult))):  # built top-down, stored by level index
            level, cout = nn.Module(), ch * ch_mult[i]
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(c, cout))
                c = cout
            level.block = nn.ModuleList(blocks)
            if i != 0:
                level.upsample = Upsample(c)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c)
        self.conv_out = _conv3(c, out_ch)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for blk in level.block:
                h = blk(h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class KLDecoder(nn.Module):
    """``post_quant_conv`` + ``decoder`` of the KL-16 ``AutoencoderKL``."""

    def __init__(self):
        super().__init__()
        self.post_quant_conv = nn.Conv2d(EMBED_DIM, Z_CHANNELS, 1)
        self.decoder = Decoder()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent ``[B, 16, h, w]`` -> image ``[B, 3, 16h, 16w]`` (about [-1, 1])."""
        return self.decoder(self.post_quant_conv(z))

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """MAR-scaled latent (as returned by ``sample_tokens``) -> image."""
        return self.decode(tokens / MAR_LATENT_SCALE)

    forward = decode


_KEEP = ("decoder.", "post_quant_conv.")


def _read(path: Path):
    try:
        return torch_load_weights(path)
    except Exception as e:  # zip/pickle/EOF/unsafe-global errors all mean: not a usable checkpoint
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint (truncated, corrupt, or holding "
            f"objects other than tensors): {type(e).__name__}: {e}") from e


def load_vae(path, device="cpu", dtype=torch.float32) -> KLDecoder:
    """Load the KL-16 decoder from a ``kl16.ckpt``-style file (encoder weights are ignored)."""
    path = Path(os.fspath(path))
    if not path.is_file():
        raise CheckpointError(f"VAE checkpoint not found: {path}")
    obj = _read(path)
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    sd = {k: v for k, v in obj.items()
          if isinstance(k, str) and k.startswith(_KEEP) and isinstance(v, torch.Tensor)}
    if not any(k.startswith("decoder.") for k in sd):
        raise CheckpointError(f"{path}: not a KL-16 VAE checkpoint (no 'decoder.*' weights)")

    with torch.device("meta"):
        model = KLDecoder()
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in sd]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} missing VAE decoder keys, e.g. "
                              + ", ".join(missing[:5]))
    extra = [k for k in sd if k not in want]
    if extra:
        raise CheckpointError(f"{path}: unexpected VAE decoder keys (not a KL-16 decoder?): "
                              + ", ".join(extra[:5]))
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(f"{path}: shape mismatch for {k}: expected {list(shape)}, "
                                  f"found {list(sd[k].shape)}")
    check_dtypes(sd, str(path))
    check_finite(sd, str(path))
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)
