"""Model configuration: the published MAR constructor arguments plus the engine's sampling options.

Every field is parsed to its declared type (`coerce_fields`) whether it comes from a checkpoint's
`args`, an engine directory's config.json or keyword overrides, and the sizes are checked against
the limits below (`check_limits`) before anything is allocated.

Size limits (each raises `ConfigError` naming the field and the limit). They are far above every
published model (MAR-H: 20 + 20 blocks of width 1280, head 12 x 1536, 256 tokens, ~0.94e9
parameters) and exist so that a corrupt or hostile configuration fails in microseconds instead of
building a billion modules or asking torch for terabytes:

- ``MAX_DEPTH = 256``: encoder_depth, decoder_depth, diffloss_d (blocks).
- ``MAX_WIDTH = 16384``: encoder_embed_dim, decoder_embed_dim, diffloss_w.
- ``MAX_HEADS = 1024``: encoder_num_heads, decoder_num_heads (and never above the width).
- ``MAX_MLP_RATIO = 64.0``: mlp_ratio (> 0; the MLP hidden width int(width * mlp_ratio) >= 1).
- ``MAX_CLASSES = 1_000_000``: class_num.
- ``MAX_IMG_SIZE = 8192``: img_size (pixels).
- ``MAX_STRIDE = 256``: vae_stride, patch_size.
- ``MAX_TOKEN_DIM = 65536``: vae_embed_dim and token_dim = vae_embed_dim * patch_size**2.
- ``MAX_SEQ_LEN = 16384``: seq_len = (img_size // vae_stride // patch_size) ** 2 (tokens).
- ``MAX_BUFFER_SIZE = 16384``: buffer_size.
- ``MAX_PARAMS = 20_000_000_000``: the parameter count the configuration implies
  (`estimate_params`, exact for `engine.models.mar.MAR`; 80 GB in float32).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import ConfigError

MAX_DEPTH = 256
MAX_WIDTH = 16384
MAX_HEADS = 1024
MAX_MLP_RATIO = 64.0
MAX_CLASSES = 1_000_000
MAX_IMG_SIZE = 8192
MAX_STRIDE = 256
MAX_TOKEN_DIM = 65536
MAX_SEQ_LEN = 16384
MAX_BUFFER_SIZE = 16384
MAX_PARAMS = 20_000_000_000

# Head sizes fixed by the published code (timestep embedding frequencies).
_HEAD_FREQ_DIM = 256

# Transformer sizes of the published presets and the diffusion-head sizes of the released
# checkpoints (the published code's own default head is 3 x 1024; `args` records the real one).
PRESETS: dict[str, dict] = {
    "mar_base": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                     decoder_embed_dim=768, decoder_depth=12, decoder_num_heads=12,
                     diffloss_d=6, diffloss_w=1024),
    "mar_large": dict(encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16,
                      decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16,
                      diffloss_d=8, diffloss_w=1280),
    "mar_huge": dict(encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16,
                     decoder_embed_dim=1280, decoder_depth=20, decoder_num_heads=16,
                     diffloss_d=12, diffloss_w=1536),
}


# Typed fields ----------------------------------------------------------------------------------
# `coerce_fields(cls, values)` parses each value to the type declared for that field of the
# dataclass `cls`. A field may name its own parser with `field(metadata={"coerce": fn})`, where
# `fn(name, value)` returns the parsed value or raises ConfigError; otherwise the declared type
# picks one of the parsers below (int, float, bool, str; `X | None` also takes None). Fields of
# other types are passed through unchanged.

def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _refuse(name: str, want: str, value) -> ConfigError:
    return ConfigError(f"config field {name} must be {want}, got {_show(value)} "
                       f"({type(value).__name__})")


def _is_bool(value) -> bool:
    # bool, numpy.bool_ and 0-d boolean arrays alike
    return isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", None) == "b"


def parse_int(name: str, value) -> int:
    """An int from an int, an integer-valued float (4.0) or string ("4", " 4 ", "4.0");
    booleans, fractions (4.5), non-finite numbers and other strings are refused."""
    if _is_bool(value):
        raise _refuse(name, "an integer (not a boolean)", value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isfinite(v) and v.is_integer():
            return int(v)
        raise _refuse(name, "an integer", value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            v = float(text)
        except ValueError:
            raise _refuse(name, "an integer", value) from None
        if math.isfinite(v) and v.is_integer():
            return int(v)
    raise _refuse(name, "an integer", value)


def parse_float(name: str, value) -> float:
    """A finite float from a number (not a boolean) or a numeric string ("4", "0.5", "1e-3")."""
    if _is_bool(value):
        raise _refuse(name, "a number (not a boolean)", value)
    if isinstance(value, numbers.Real):
        v = float(value)
    elif isinstance(value, str):
        try:
            v = float(value.strip())
        except ValueError:
            raise _refuse(name, "a number", value) from None
    else:
        raise _refuse(name, "a number", value)
    if not math.isfinite(v):
        raise _refuse(name, "a finite number", value)
    return v


_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def parse_bool(name: str, value) -> bool:
    """A bool from a bool, the numbers 0/1, or the strings true/false, 1/0, yes/no (any case)."""
    if _is_bool(value):
        return bool(value)
    if isinstance(value, numbers.Real) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise _refuse(name, "a boolean (true/false, 1/0, yes/no)", value)


def parse_str(name: str, value) -> str:
    if isinstance(value, str):
        return value
    raise _refuse(name, "a string", value)


def parse_steps(name: str, value) -> str:
    """num_sampling_steps: a string ("100", "ddim10", "10,5") or an int (100)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, numbers.Integral) and not _is_bool(value):
        return str(int(value))
    raise _refuse(name, "a string such as '100', 'ddim10' or '10,5', or an integer", value)


def parse_range(name: str, value) -> tuple:
    """A (low, high) pair of finite floats from a list or tuple of two numbers."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _refuse(name, "a list or tuple of two numbers", value)
    return tuple(parse_float(f"{name}[{i}]", v) for i, v in enumerate(value))


_PARSERS = {int: parse_int, float: parse_float, bool: parse_bool, str: parse_str}


def _parser_for(hint):
    """(parser, accepts None) for a resolved type hint."""
    optional = False
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else None
    return _PARSERS.get(hint), optional


_HINTS: dict = {}


def _field_parsers(cls) -> dict:
    cached = _HINTS.get(cls)
    if cached is None:
        hints = typing.get_type_hints(cls)
        cached = {}
        for f in dataclasses.fields(cls):
            custom = f.metadata.get("coerce")
            parser, optional = (custom, False) if custom else _parser_for(hints.get(f.name))
            if custom and f.metadata.get("optional"):
                optional = True
            cached[f.name] = (parser, optional)
        _HINTS[cls] = cached
    return cached


def coerce_fields(cls, values) -> dict:
    """`values` (a dict or argparse.Namespace) with every entry parsed to the type of the field
    of the dataclass `cls` that it names; ConfigError naming the field and the value otherwise,
    and for names `cls` has no field for."""
    if isinstance(values, Mapping):
        items = dict(values)
    elif isinstance(values, argparse.Namespace):
        items = dict(vars(values))
    else:
        raise ConfigError(f"{cls.__name__} values must be a dict or argparse.Namespace, got "
                          f"{type(values).__name__}")
    parsers = _field_parsers(cls)
    unknown = [k for k in items if k not in parsers]
    if unknown:
        raise ConfigError(f"unknown config fields: {sorted(map(str, unknown))}")
    out = {}
    for name, value in items.items():
        parser, optional = parsers[name]
        if value is None and optional:
            out[name] = None
        elif parser is None:
            out[name] = value
        else:
            out[name] = parser(name, value)
    return out


class ConfigMixin:
    """What every family's configuration dataclass shares: typed construction from a dict
    (`coerce_fields`), presets (`PRESETS` of the class), a JSON-ready dict."""

    PRESETS: dict = {}
    IGNORED: frozenset = frozenset()   # constructor arguments that only matter for training

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["clip_range"] = list(self.clip_range)
        return d

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: dict):
        return cls(**coerce_fields(cls, {k: v for k, v in values.items() if k not in cls.IGNORED}))

    @classmethod
    def from_preset(cls, name: str, **overrides):
        if name not in cls.PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {sorted(cls.PRESETS)}")
        return cls.from_dict({**cls.PRESETS[name], **overrides})

    def _coerce_and_validate(self) -> None:
        # Direct construction (Config(img_size="64")) is parsed the same way as from_dict.
        for name, value in coerce_fields(type(self), self.__dict__).items():
            setattr(self, name, value)
        self.validate()


@dataclass
class MARConfig(ConfigMixin):
    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    vae_embed_dim: int = 16
    encoder_embed_dim: int = 1024
    encoder_depth: int = 16
    encoder_num_heads: int = 16
    decoder_embed_dim: int = 1024
    decoder_depth: int = 16
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    class_num: int = 1000
    buffer_size: int = 64
    diffloss_d: int = 3
    diffloss_w: int = 1024
    num_sampling_steps: str = field(default="100", metadata={"coerce": parse_steps})
    # Engine additions. `tokenizer`: "vae" (KL-16 latents) or "pixels" (patchified pixels,
    # vae_stride 1, vae_embed_dim = image channels, values in [-1, 1]).
    tokenizer: str = "vae"
    # Clip the predicted x0 to `clip_range` before the posterior mean (pixel models; the
    # published sampler never clips).
    clip_denoised: bool = False
    clip_range: tuple = field(default=(-1.0, 1.0), metadata={"coerce": parse_range})

    def __post_init__(self):
        self._coerce_and_validate()

    # Derived sizes -----------------------------------------------------------------------
    @property
    def seq_h(self) -> int:
        return self.img_size // self.vae_stride // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.seq_h * self.seq_h

    @property
    def token_dim(self) -> int:
        return self.vae_embed_dim * self.patch_size ** 2

    def validate(self) -> None:
        for name in ("img_size", "vae_stride", "patch_size", "vae_embed_dim", "encoder_embed_dim",
                     "encoder_num_heads", "decoder_embed_dim", "decoder_num_heads", "class_num",
                     "diffloss_w"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        for name in ("encoder_depth", "decoder_depth", "diffloss_d", "buffer_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"config field {name} must be a non-negative integer, got {value!r}")
        check_limits(self)
        if self.img_size % (self.vae_stride * self.patch_size):
            raise ConfigError(f"img_size {self.img_size} is not a multiple of vae_stride*patch_size "
                              f"= {self.vae_stride * self.patch_size}")
        for prefix in ("encoder", "decoder"):
            width, heads = getattr(self, f"{prefix}_embed_dim"), getattr(self, f"{prefix}_num_heads")
            if width % heads:
                raise ConfigError(f"{prefix}_embed_dim {width} is not divisible by "
                                  f"{prefix}_num_heads {heads}")
        if self.tokenizer not in ("vae", "pixels"):
            raise ConfigError(f"tokenizer must be 'vae' or 'pixels', got {self.tokenizer!r}")
        if self.clip_range[0] >= self.clip_range[1]:
            raise ConfigError(f"clip_range {self.clip_range} is empty")
        check_params(self)

MARConfig.PRESETS = PRESETS


# Size limits ---------------------------------------------------------------------------------
_LIMITS = (
    (("encoder_depth", "decoder_depth", "diffloss_d"), "MAX_DEPTH", MAX_DEPTH),
    (("encoder_embed_dim", "decoder_embed_dim", "diffloss_w"), "MAX_WIDTH", MAX_WIDTH),
    (("encoder_num_heads", "decoder_num_heads"), "MAX_HEADS", MAX_HEADS),
    (("class_num",), "MAX_CLASSES", MAX_CLASSES),
    (("img_size",), "MAX_IMG_SIZE", MAX_IMG_SIZE),
    (("vae_stride", "patch_size"), "MAX_STRIDE", MAX_STRIDE),
    (("vae_embed_dim",), "MAX_TOKEN_DIM", MAX_TOKEN_DIM),
    (("buffer_size",), "MAX_BUFFER_SIZE", MAX_BUFFER_SIZE),
)


def _over(what: str, value, limit_name: str, limit) -> ConfigError:
    return ConfigError(f"{what} = {value} exceeds the engine's limit {limit_name} = {limit} "
                       "(engine/core/config.py)")


def check_limits(config) -> None:
    """The per-field and derived size limits of the module docstring (integers already
    checked positive); the parameter-count limit is `check_params`."""
    for names, limit_name, limit in _LIMITS:
        for name in names:
            value = getattr(config, name)
            if value > limit:
                raise _over(f"config field {name}", value, limit_name, limit)
    for prefix in ("encoder", "decoder"):
        heads, width = getattr(config, f"{prefix}_num_heads"), getattr(config, f"{prefix}_embed_dim")
        if heads > width:
            raise ConfigError(f"config field {prefix}_num_heads = {heads} exceeds "
                              f"{prefix}_embed_dim = {width}")
    ratio = config.mlp_ratio
    if not ratio > 0:
        raise ConfigError(f"config field mlp_ratio must be positive, got {ratio!r}")
    if ratio > MAX_MLP_RATIO:
        raise _over("config field mlp_ratio", ratio, "MAX_MLP_RATIO", MAX_MLP_RATIO)
    for prefix in ("encoder", "decoder"):
        width = getattr(config, f"{prefix}_embed_dim")
        if int(width * ratio) < 1:
            raise ConfigError(f"mlp_ratio {ratio} gives {prefix} blocks an MLP of width "
                              f"int({width} * {ratio}) = 0")
    if config.token_dim > MAX_TOKEN_DIM:
        raise _over("token_dim (vae_embed_dim * patch_size**2)", config.token_dim,
                    "MAX_TOKEN_DIM", MAX_TOKEN_DIM)
    if config.seq_len > MAX_SEQ_LEN:
        raise _over("seq_len ((img_size // vae_stride // patch_size)**2)", config.seq_len,
                    "MAX_SEQ_LEN", MAX_SEQ_LEN)


def check_params(config) -> None:
    n = estimate_params(config)
    if n > MAX_PARAMS:
        raise _over(f"the parameter count of this configuration ({describe_sizes(config)})",
                    f"{n:,}", "MAX_PARAMS", f"{MAX_PARAMS:,}")


def describe_sizes(config) -> str:
    c = config
    return (f"encoder {c.encoder_depth} x {c.encoder_embed_dim}, decoder {c.decoder_depth} x "
            f"{c.decoder_embed_dim}, head {c.diffloss_d} x {c.diffloss_w}, class_num {c.class_num}, "
            f"seq_len {c.seq_len} + buffer {c.buffer_size}")


def _block_params(width: int, mlp_ratio: float) -> int:
    """A ViT block: two LayerNorms, qkv + proj, fc1 + fc2 (all with biases)."""
    hidden = int(width * mlp_ratio)
    return 4 * width * width + 2 * width * hidden + 9 * width + hidden


def _head_params(token_dim: int, cond_dim: int, width: int, depth: int) -> int:
    """The diffusion head (SimpleMLPAdaLN)."""
    w, c = width, token_dim
    time_embed = _HEAD_FREQ_DIM * w + w + w * w + w
    cond_embed = cond_dim * w + w
    input_proj = c * w + w
    res_block = 2 * w + 2 * (w * w + w) + 3 * w * w + 3 * w
    final = 2 * w * c + 2 * c + 2 * w * w + 2 * w
    return time_embed + cond_embed + input_proj + depth * res_block + final


def estimate_params(config) -> int:
    """The number of parameters of `engine.models.mar.MAR(config)`, computed from the sizes alone
    (exact; no tensors are made). Works on any object with MARConfig's size fields."""
    c = config
    e, d, length, buf = c.encoder_embed_dim, c.decoder_embed_dim, c.seq_len, c.buffer_size
    token_dim = c.vae_embed_dim * c.patch_size ** 2
    encoder = (c.class_num * e + e                       # class_emb, fake_latent
               + token_dim * e + e + 2 * e               # z_proj, z_proj_ln
               + (length + buf) * e                      # encoder_pos_embed_learned
               + c.encoder_depth * _block_params(e, c.mlp_ratio) + 2 * e)
    decoder = (e * d + d + d                             # decoder_embed, mask_token
               + (length + buf) * d                      # decoder_pos_embed_learned
               + c.decoder_depth * _block_params(d, c.mlp_ratio) + 2 * d
               + length * d)                             # diffusion_pos_embed_learned
    return encoder + decoder + _head_params(token_dim, d, c.diffloss_w, c.diffloss_d)


def config_from_args(args: dict, inferred: dict, overrides: dict, config_cls=None, presets=None,
                     head_fields=("encoder_num_heads", "decoder_num_heads"), ignored=frozenset()):
    """Configuration of a published checkpoint (MAR's by default; a family passes its own
    `config_cls`, `presets`, `head_fields`), lowest precedence first: the preset named by
    `args["model"]`, sizes `inferred` from the tensor shapes, the run's recorded `args`, then the
    caller's keyword `overrides` (`ignored`: constructor arguments that only matter for training).
    Head counts cannot be inferred, so one of the others must give them."""
    config_cls = config_cls or MARConfig
    presets = PRESETS if presets is None else presets
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, Mapping):
        raise ConfigError(f"the run's args must be an argparse.Namespace or a dict, got "
                          f"{type(args).__name__}")
    names = config_cls.field_names()
    preset = args.get("model")
    values: dict = {}
    if isinstance(preset, str) and preset in presets:
        values.update(presets[preset])
    values.update(inferred)
    values.update({k: v for k, v in args.items() if k in names})
    values.update({k: v for k, v in overrides.items() if k not in ignored})
    for key in head_fields:
        if key not in values:
            hint = f"model {preset!r} is not a preset ({sorted(presets)}) and" if preset else "it"
            raise ConfigError(f"the checkpoint does not give {key}: {hint} records no head count, "
                              f"which the weights cannot tell; pass {key}=N (--config {key}=N)")
    return config_cls.from_dict(values)


def check_int_range(name, value, low, high) -> None:
    """An integer configuration field in [low, high], or a ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"config field {name} must be an integer >= {low}, got {value!r}")
    if value > high:
        raise ConfigError(f"config field {name} = {value} exceeds the engine's limit {high}")
