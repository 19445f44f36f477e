"""Model configuration: the published MAR constructor arguments plus the engine's sampling options."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import ConfigError

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


@dataclass
class MARConfig:
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
    num_sampling_steps: str = "100"
    # Engine additions. `tokenizer`: "vae" (KL-16 latents) or "pixels" (patchified pixels,
    # vae_stride 1, vae_embed_dim = image channels, values in [-1, 1]).
    tokenizer: str = "vae"
    # Clip the predicted x0 to `clip_range` before the posterior mean (pixel models; the
    # published sampler never clips).
    clip_denoised: bool = False
    clip_range: tuple = field(default=(-1.0, 1.0))

    def __post_init__(self):
        self.num_sampling_steps = str(self.num_sampling_steps)
        self.clip_range = tuple(float(v) for v in self.clip_range)
        self.validate()

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

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["clip_range"] = list(self.clip_range)
        return d

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: dict) -> "MARConfig":
        unknown = set(values) - cls.field_names()
        if unknown:
            raise ConfigError(f"unknown config fields: {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MARConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def config_from_args(args: dict, inferred: dict, overrides: dict) -> MARConfig:
    """Configuration of a published checkpoint, lowest precedence first: the preset named by
    `args["model"]`, sizes `inferred` from the tensor shapes, the run's recorded `args`, then the
    caller's keyword `overrides`. Head counts cannot be inferred, so one of the others must give them."""
    names = MARConfig.field_names()
    preset = args.get("model")
    values: dict = {}
    if preset in PRESETS:
        values.update(PRESETS[preset])
    values.update(inferred)
    values.update({k: v for k, v in args.items() if k in names})
    values.update(overrides)
    for key in ("encoder_num_heads", "decoder_num_heads"):
        if key not in values:
            hint = f"model {preset!r} is not a preset ({sorted(PRESETS)}) and" if preset else "it"
            raise ConfigError(f"the checkpoint does not give {key}: {hint} records no head count, "
                              f"which the weights cannot tell; pass {key}=N")
    return MARConfig.from_dict(values)
