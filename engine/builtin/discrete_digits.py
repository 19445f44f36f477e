"""The digits as discrete tokens: a small binary autoencoder (BAE) in ELM's BinaryAutoEncoder
layout (Pepper-lll/LMforImageGeneration `bae/binaryae.py`), and the token data that the built-in
discrete models (digits-elm-ar, digits-elm-mlm, digits-ctf) are trained on.

    bae = load_digits_bae()                          # engine/builtin/assets/digits-bae (encoder + decoder)
    codes = encode_digits(images)                    # [N, 16, 2] sub-token indices, MSB first
    codes, labels = digits_codes("train")            # the fixed train split, cached

The autoencoder maps a 16 x 16 digit (engine.builtin.digits' range [-1, 1]) to a 4 x 4 grid of K = 16
bits, i.e. 16 positions of `token_each` = 2 sub-tokens of `code_dim` = 8 bits (vocabulary 256),
and back to an image in [0, 1] (ELM's decode range). Its state dict has ELM's keys:
  encoder.blocks.*    conv, ResBlocks with two Downsamples (16 -> 8 -> 4), ResBlock, AttnBlock,
                      ResBlock, GroupNorm, conv to emb_dim channels
  quantize.proj.0.*   1x1 conv to K logits (a sigmoid follows: bit probabilities)
  quantize.embed      [K, emb_dim]: bits -> the generator's input (einsum, as ELM decodes)
  generator.blocks.*  exactly what engine.decoders.bae.build_decoder reads back
so `engine.load_bae` decodes its tokens unchanged (it ignores the encoder keys). Bits are drawn
Bernoulli(p) with a straight-through gradient while training and thresholded (p > 0.5) to
encode, as ELM's quantizer does.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import ConfigMixin
from ..core.config import check_int_range
from ..core.errors import CheckpointError, ConfigError, EngineError
from ..decoders.bae import GROUPS, AttnBlock, BAEDecoder, ResBlock, Upsample, _norm, build_decoder

BAE_ASSET = Path(__file__).parent / "assets" / "digits-bae"
BAE_FILE = "bae.safetensors"        # the weights (encoder + quantizer + generator)
BAE_CONFIG_FILE = "bae.json"        # BAEConfig + the training record
IMAGE_SIZE = 16


@dataclass
class BAEConfig(ConfigMixin):
    """Sizes of the digits BAE (the names of ELM's hparams where they exist)."""
    img_size: int = IMAGE_SIZE
    n_channels: int = 1
    nf: int = 32
    ch_mult: tuple = (1, 1, 2)      # len - 1 downsamplings: 16 -> 4 with three levels
    res_blocks: int = 1
    emb_dim: int = 32
    token_each: int = 2
    code_dim: int = 8

    def __post_init__(self):
        if not isinstance(self.ch_mult, (list, tuple)) or not all(
                isinstance(m, int) and not isinstance(m, bool) for m in self.ch_mult):
            raise ConfigError(f"config field ch_mult must be a list of integers, got {self.ch_mult!r}")
        self.ch_mult = tuple(self.ch_mult)
        self._coerce_and_validate()

    @property
    def bits(self) -> int:
        return self.token_each * self.code_dim

    @property
    def grid(self) -> int:
        return self.img_size // 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["ch_mult"] = list(self.ch_mult)
        return d

    def validate(self) -> None:
        for name, (low, high) in {"img_size": (4, 256), "n_channels": (1, 4), "nf": (GROUPS, 1024),
                                  "res_blocks": (1, 8), "emb_dim": (1, 1024), "token_each": (1, 64),
                                  "code_dim": (1, 24)}.items():
            check_int_range(name, getattr(self, name), low, high)
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ConfigError(f"config field ch_mult must be positive multipliers, got {self.ch_mult}")
        if self.nf % GROUPS:
            raise ConfigError(f"config field nf={self.nf} must be a multiple of {GROUPS} (GroupNorm(32))")
        if self.img_size % 2 ** (len(self.ch_mult) - 1):
            raise ConfigError(f"img_size {self.img_size} is not divisible by the {len(self.ch_mult) - 1} "
                              "downsamplings of ch_mult")


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row / column at the bottom / right (ELM's)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Blocks(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class Quantizer(nn.Module):
    """`proj` (1x1 conv + sigmoid: bit probabilities) and `embed` (bits -> generator input)."""

    def __init__(self, in_channels: int, bits: int, emb_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(in_channels, bits, 1), nn.Sigmoid())
        self.embed = nn.Embedding(bits, emb_dim)


def _encoder_blocks(c: BAEConfig) -> list:
    blocks, ch = [nn.Conv2d(c.n_channels, c.nf, 3, padding=1)], c.nf
    for level, mult in enumerate(c.ch_mult):
        for _ in range(c.res_blocks):
            blocks.append(ResBlock(ch, c.nf * mult))
            ch = c.nf * mult
        if level != len(c.ch_mult) - 1:
            blocks.append(Downsample(ch))
    blocks += [ResBlock(ch, ch), AttnBlock(ch), ResBlock(ch, ch), _norm(ch), nn.Conv2d(ch, c.emb_dim, 3, padding=1)]
    return blocks


def _generator_blocks(c: BAEConfig) -> list:
    ch = c.nf * c.ch_mult[-1]
    blocks = [nn.Conv2d(c.emb_dim, ch, 3, padding=1), ResBlock(ch, ch), AttnBlock(ch), ResBlock(ch, ch)]
    for level in reversed(range(len(c.ch_mult))):
        for _ in range(c.res_blocks):
            blocks.append(ResBlock(ch, c.nf * c.ch_mult[level]))
            ch = c.nf * c.ch_mult[level]
        if level != 0:
            blocks.append(Upsample(ch))
    return blocks + [_norm(ch), nn.Conv2d(ch, c.n_channels, 3, padding=1)]


class DigitsBAE(nn.Module):
    """The whole autoencoder (trainable). `decoder` shares `quantize.embed` and `generator` with
    it: the decoding half as engine.decoders.bae.BAEDecoder runs it."""

    def __init__(self, config: BAEConfig):
        super().__init__()
        c = self.config = config
        self.encoder = Blocks(_encoder_blocks(c))
        self.quantize = Quantizer(c.emb_dim, c.bits, c.emb_dim)
        self.generator = Blocks(_generator_blocks(c))

    def bit_probs(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, C, S, S] in [-1, 1] -> bit probabilities [N, K, grid, grid]."""
        return self.quantize.proj(self.encoder(images))

    def decode_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """bits [N, K, g, g] (0/1, or straight-through floats) -> images [N, C, S, S], about [0, 1]."""
        return self.generator(torch.einsum("b n h w, n d -> b d h w", bits, self.quantize.embed.weight))

    def forward(self, images: torch.Tensor, generator=None):
        """Training pass: (reconstruction in [0, 1], bit probabilities). Bits ~ Bernoulli(p) with
        the straight-through gradient of p."""
        probs = self.bit_probs(images)
        bits = torch.bernoulli(probs.detach(), generator=generator)
        return self.decode_bits(bits + probs - probs.detach()), probs

    @torch.no_grad()
    def encode_bits(self, images: torch.Tensor) -> torch.Tensor:
        return (self.bit_probs(images) > 0.5).float()


# Bits <-> ELM sub-token indices ------------------------------------------------------------------
def bits_to_indices(bits: torch.Tensor, token_each: int) -> torch.Tensor:
    """bits [N, K, g, g] -> sub-token indices [N, g * g, token_each] int64: positions row-major,
    each position's K bits cut into token_each groups of K / token_each, read MSB first (the
    inverse of BAEDecoder.indices_to_bits)."""
    n, k, h, w = bits.shape
    code_dim = k // token_each
    groups = bits.permute(0, 2, 3, 1).reshape(n, h * w, token_each, code_dim).to(torch.int64)
    weights = 2 ** torch.arange(code_dim - 1, -1, -1, device=bits.device)
    return (groups * weights).sum(-1)


# Loading -----------------------------------------------------------------------------------------
def _read_bae_dir(path: Path) -> tuple[dict, BAEConfig, dict]:
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..loading import check_finite

    weights, cfg_file = path / BAE_FILE, path / BAE_CONFIG_FILE
    if not weights.exists() or not cfg_file.exists():
        raise CheckpointError(f"{path} is not a digits BAE directory: it needs {BAE_FILE} and {BAE_CONFIG_FILE}")
    try:
        meta = json.loads(cfg_file.read_text())
        config = BAEConfig.from_dict(meta["config"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{cfg_file}: not a digits BAE config ({err})") from None
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {err}") from None
    check_finite(state, str(weights))
    return state, config, meta


def load_digits_bae(path=None) -> DigitsBAE:
    """The full autoencoder (encoder too) from a digits BAE directory (default: the built-in
    engine/builtin/assets/digits-bae), float32, eval mode."""
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"expected a digits BAE directory, got {type(path).__name__}")
    path = BAE_ASSET if path is None or path == "digits-bae" else Path(path)
    state, config, _ = _read_bae_dir(path)
    with torch.device("meta"):
        model = DigitsBAE(config)
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in wanted]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    for key, value in wanted.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{path}: {key} has shape {list(state[key].shape)}, expected {list(value.shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return model.eval().requires_grad_(False)


def decoder_of(bae: DigitsBAE) -> BAEDecoder:
    """The engine's BAE decoder built from this autoencoder's state dict (as load_bae builds it)."""
    return build_decoder({k: v.detach().cpu() for k, v in bae.state_dict().items()}, "digits BAE")


def save_digits_bae(bae: DigitsBAE, out_dir, extra: dict | None = None) -> Path:
    """DIR/bae.safetensors (float32) + DIR/bae.json (config + `extra`, e.g. the training record)."""
    import json

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in bae.state_dict().items()}, str(out / BAE_FILE))
    meta = {"format": "engine-digits-bae", "version": 1, "config": bae.config.to_dict(), **(extra or {})}
    (out / BAE_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


# Codes of the digits -------------------------------------------------------------------------------
def _check_images(images, config: BAEConfig) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.ndim != 4 \
            or tuple(images.shape[1:]) != (config.n_channels, config.img_size, config.img_size):
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise EngineError(f"images must be a float tensor [N, {config.n_channels}, {config.img_size}, "
                          f"{config.img_size}] in [-1, 1] (engine.digits.load_split), got {shape}")
    if not torch.isfinite(images).all():
        raise EngineError("images hold NaN or Inf values")
    return images.float()


@torch.no_grad()
def encode_digits(images: torch.Tensor, bae: DigitsBAE | None = None, batch: int = 512) -> torch.Tensor:
    """images [N, 1, 16, 16] in [-1, 1] -> codes [N, 16, token_each] int64: sub-token indices,
    MSB first, positions row-major (what BAEDecoder.decode_indices and the ELM models read)."""
    bae = _default_bae() if bae is None else bae
    images = _check_images(images, bae.config)
    out = [bits_to_indices(bae.encode_bits(images[k:k + batch]), bae.config.token_each)
           for k in range(0, len(images), batch)]
    return torch.cat(out) if out else torch.zeros(0, bae.config.grid ** 2, bae.config.token_each, dtype=torch.int64)


@functools.lru_cache(maxsize=1)
def _default_bae() -> DigitsBAE:
    return load_digits_bae()


@functools.lru_cache(maxsize=4)
def _codes(split: str, path: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    from .digits import load_split

    bae = _default_bae() if path is None else load_digits_bae(path)
    images, labels = load_split(split, size=bae.config.img_size)
    return encode_digits(images, bae), labels


def digits_codes(split: str = "train", bae_path=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, 16, token_each] int64, labels [N]) of engine.builtin.digits' "train" / "heldout" / "all"
    split under the built-in BAE (or the one in `bae_path`); computed once per process. Copies:
    callers may change them."""
    if split not in ("train", "heldout", "all"):
        raise EngineError(f"unknown split {split!r}; expected 'train', 'heldout' or 'all'")
    codes, labels = _codes(split, None if bae_path is None else str(bae_path))
    return codes.clone(), labels.clone()
