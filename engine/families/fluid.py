"""Fluid (text-to-image MAR) as published by LightGen (`models/fluid_arbitrary.py` `FLUID`):
its configuration, presets, checkpoint recognition and `FluidModel.sample_tokens`.
The modules are in engine/models/fluid.py."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.conditioning import Condition
from ..core.config import (MAX_DEPTH, MAX_HEADS, MAX_MLP_RATIO, MAX_PARAMS, MAX_SEQ_LEN, MAX_STRIDE,
                      MAX_TOKEN_DIM, MAX_WIDTH, MAX_IMG_SIZE, ConfigMixin, _block_params,
                      _head_params, parse_range, parse_steps)
from ..core.config import check_int_range as _check_range
from ..core.errors import ConfigError, SamplingError
from ..core.protocol import check_num_images
from ..model import Model
from ..core.plan import MAX_BATCH, check_count
from .record import Family
from .mar import depth_of, from_published, head_and_mlp_sizes, is_fluid, shape_of

# The published preset functions (fluid_base / _large / _huge): transformer sizes only; the head
# sizes come from the run's args (LightGen's pipeline: diffloss_d=8, diffloss_w=1536).
PRESETS: dict[str, dict] = {
    name: dict(encoder_embed_dim=w, encoder_depth=d, encoder_num_heads=h,
               decoder_embed_dim=w, decoder_depth=d, decoder_num_heads=h,
               cross_embed_dim=w, cross_depth=d, cross_num_heads=h, mlp_ratio=4.0)
    for name, (w, d, h) in {"fluid_base": (768, 12, 12), "fluid_large": (1024, 16, 16),
                            "fluid_huge": (1280, 20, 16)}.items()
}
# FLUID constructor arguments that only matter for training: accepted and ignored.
FAMILY_NAME = "fluid"
# fast= modes (engine.core.fast): DiSA anneals the diffusion head's steps, LazyMAR caches features.
FAST_MODES = ("disa", "lazy")
TRAINING_ONLY = frozenset({"mask_ratio_min", "text_drop_prob", "attn_dropout", "proj_dropout",
                           "diffusion_batch_mul", "grad_checkpointing"})
MAX_TEXT_LENGTH = 4096
MAX_CAPTION_CHANNELS = 65536


@dataclass
class FluidConfig(ConfigMixin):
    """FLUID's constructor arguments (same names and defaults) plus the engine's options."""
    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    text_depth: int = 6
    encoder_embed_dim: int = 1024
    encoder_depth: int = 16
    encoder_num_heads: int = 16
    decoder_embed_dim: int = 1024
    decoder_depth: int = 16
    decoder_num_heads: int = 16
    cross_embed_dim: int = 1024
    cross_depth: int = 16
    cross_num_heads: int = 16
    mlp_ratio: float = 4.0
    caption_channels: int = 4096
    max_length: int = 512
    interpolate_offset: float = 0.1
    vae_embed_dim: int = 16
    diffloss_d: int = 3
    diffloss_w: int = 1024
    num_sampling_steps: str = field(default="100", metadata={"coerce": parse_steps})
    # Engine additions. LayerNorm eps of every norm_layer norm: the presets pass 1e-6 (FLUID's own
    # default, plain nn.LayerNorm, would be 1e-5); z_proj_ln is always 1e-6.
    norm_eps: float = 1e-6
    # "vae": latents of a diffusers AutoencoderKL (the SD-3.5 VAE); "pixels": patchified pixels.
    tokenizer: str = "vae"
    clip_denoised: bool = False
    clip_range: tuple = field(default=(-1.0, 1.0), metadata={"coerce": parse_range})
    max_seq_len: int = 4096   # most tokens one call may sample (any height x width)
    img_width: int = 0        # default width when it differs from img_size (0: square)
    # LightGen reads interpolated position tables back w-major (published; see
    # models/fluid.interpolate_positions); False: h-major, as the tokens (the built-in model).
    interpolate_w_major: bool = True
    # Engine options for models trained here (off: LightGen's FLUID, whose text reaches the image
    # tokens only through the cross blocks after the decoder). text_positions: a learned table of
    # text positions (max_length rows) added in the aligner; decoder_text: the aligned text rows,
    # through a Linear, prefix the decoder's sequence (every decoder block attends to the text,
    # as in the Fluid paper, where every block sees it); encoder_text: the aligned text rows,
    # through a Linear, prefix the encoder's sequence as MAR's class buffer does (the encoder and
    # decoder then read the text and the known tokens together; their outputs prefix the decoder).
    text_positions: bool = False
    decoder_text: bool = False
    encoder_text: bool = False

    def __post_init__(self):
        self._coerce_and_validate()

    @property
    def token_dim(self) -> int:
        return self.vae_embed_dim * self.patch_size ** 2

    @property
    def seq_h(self) -> int:
        return self.img_size // self.vae_stride // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.seq_h * self.seq_h

    def validate(self) -> None:
        limits = {"img_size": MAX_IMG_SIZE, "vae_stride": MAX_STRIDE, "patch_size": MAX_STRIDE,
                  "vae_embed_dim": MAX_TOKEN_DIM, "caption_channels": MAX_CAPTION_CHANNELS,
                  "max_length": MAX_TEXT_LENGTH, "max_seq_len": MAX_SEQ_LEN, "diffloss_w": MAX_WIDTH}
        for prefix in ("encoder", "decoder", "cross"):
            limits[f"{prefix}_embed_dim"] = MAX_WIDTH
            limits[f"{prefix}_num_heads"] = MAX_HEADS
        for name, limit in limits.items():
            _check_range(name, getattr(self, name), 1, limit)
        for name in ("text_depth", "encoder_depth", "decoder_depth", "cross_depth", "diffloss_d"):
            _check_range(name, getattr(self, name), 0, MAX_DEPTH)
        if not 0 < self.mlp_ratio <= MAX_MLP_RATIO:
            raise ConfigError(f"config field mlp_ratio must be in (0, {MAX_MLP_RATIO}], got {self.mlp_ratio}")
        if not 0 < self.norm_eps < 1:
            raise ConfigError(f"config field norm_eps must be in (0, 1), got {self.norm_eps}")
        _check_range("img_width", self.img_width, 0, MAX_IMG_SIZE)
        for name in ("img_size", "img_width"):
            if getattr(self, name) % (self.vae_stride * self.patch_size):
                raise ConfigError(f"{name} {getattr(self, name)} is not a multiple of "
                                  f"vae_stride*patch_size = {self.vae_stride * self.patch_size}")
        for prefix in ("encoder", "decoder", "cross"):
            width, heads = getattr(self, f"{prefix}_embed_dim"), getattr(self, f"{prefix}_num_heads")
            if width % heads:
                raise ConfigError(f"{prefix}_embed_dim {width} is not divisible by {prefix}_num_heads {heads}")
        # The cross blocks' output (cross width) conditions a head built for the decoder width:
        # the published model does not run otherwise. (encoder != cross width runs, but only
        # unconditionally: the text aligner has the encoder width; see Fluid.step_context.)
        if self.decoder_embed_dim != self.cross_embed_dim:
            raise ConfigError(f"FLUID needs decoder_embed_dim == cross_embed_dim (got "
                              f"{self.decoder_embed_dim} and {self.cross_embed_dim}): its diffusion "
                              "head reads the cross blocks' output as a decoder-width condition")
        if self.tokenizer not in ("vae", "pixels"):
            raise ConfigError(f"tokenizer must be 'vae' or 'pixels', got {self.tokenizer!r}")
        if self.clip_range[0] >= self.clip_range[1]:
            raise ConfigError(f"clip_range {self.clip_range} is empty")
        if self.estimate_params() > MAX_PARAMS:
            raise ConfigError(f"this configuration has {self.estimate_params():,} parameters, over "
                              f"the engine's limit MAX_PARAMS = {MAX_PARAMS:,}")

    def estimate_params(self) -> int:
        """Parameters of engine.models.fluid.Fluid(config), from the sizes alone (exact)."""
        e, d, x, r, c = (self.encoder_embed_dim, self.decoder_embed_dim, self.cross_embed_dim,
                         self.mlp_ratio, self.token_dim)
        length = 256
        text = (self.caption_channels * e + e + e * e + e + self.text_depth * _block_params(e, r) + 2 * e)
        encoder = c * e + e + 2 * e + length * e + self.encoder_depth * _block_params(e, r) + 2 * e
        decoder = e * d + d + d + length * d + self.decoder_depth * _block_params(d, r) + 2 * d
        cross = (d * x + x + length * x + x + self.cross_depth * (_block_params(x, r) + 2 * x) + 2 * x)
        options = (self.text_positions * self.max_length * e + self.decoder_text * (x * d + d)
                   + self.encoder_text * (x * e + e))
        return text + encoder + decoder + cross + options + _head_params(c, d, self.diffloss_w, self.diffloss_d)


FluidConfig.PRESETS = PRESETS
FluidConfig.IGNORED = TRAINING_ONLY


def infer_sizes(state: dict) -> dict:
    """Configuration fields that FLUID's tensor shapes determine. Not among them: head counts,
    max_length (no text position table), and vae_embed_dim vs patch_size (only their product)."""
    out = {}
    shape = lambda key: shape_of(state, key)  # noqa: E731
    if shape("z_proj.weight"):
        out["encoder_embed_dim"] = shape("z_proj.weight")[0]
    if shape("mask_token"):
        out["decoder_embed_dim"] = shape("mask_token")[-1]
    if shape("fake_latent"):
        out["cross_embed_dim"] = shape("fake_latent")[-1]
    if shape("text_emb.text_proj.linear_1.weight"):
        out["caption_channels"] = shape("text_emb.text_proj.linear_1.weight")[1]
    for name, prefix in (("text_depth", "text_emb.text_aligner"), ("encoder_depth", "encoder_blocks"),
                         ("decoder_depth", "decoder_blocks"), ("cross_depth", "cross_attn_blocks"),
                         ("diffloss_d", "diffloss.net.res_blocks")):
        out[name] = depth_of(state, prefix)
    out.update(head_and_mlp_sizes(state, out.get("encoder_embed_dim")))
    return out


class FluidModel(Model):
    """Text-to-image Fluid. `sample_tokens` has LightGen's signature and results."""

    family = FAMILY_NAME
    fast_modes = FAST_MODES

    def sample_tokens(self, bsz: int, num_iter: int = 64, cfg=1.0, cfg_schedule="linear",
                      texts=None, temperature=1.0, height: int | None = None,
                      width: int | None = None, progress: bool = False, generator=None, fast="exact"):
        """Tokens [bsz, vae_embed_dim, height / vae_stride, width / vae_stride].

        `texts`: the text encoder's output [bsz, max_length, caption_channels] (T5's
        last_hidden_state padded to max_length, as LightGen's pipeline; see
        engine.load_text_encoder), or None for unconditional samples (the null text).
        height / width default to the model's img_size (and img_width); any multiple of vae_stride * patch_size
        works (position embeddings are interpolated once per resolution, as published).
        Random numbers as MARModel.sample_tokens: after torch.manual_seed(s); np.random.seed(s)
        and no generator, LightGen's tokens."""
        bsz = check_count("bsz", bsz, MAX_BATCH)
        fast = self.check_fast(fast)
        grid = self.mar.grid(height, width)
        c = self.config
        condition = Condition.text(texts, bsz, c.max_length, c.caption_channels, self.device)
        return self.sample(bsz, condition, grid, num_iter=num_iter, cfg=cfg, cfg_schedule=cfg_schedule,
                           temperature=temperature, progress=progress, generator=generator, fast=fast)

    # The family protocol (engine/core/protocol.py) --------------------------------------------
    conditioning = "text"
    num_classes = None

    @property
    def text_shape(self) -> tuple:
        """(max_length, caption_channels) of the text-encoder outputs it reads."""
        return (self.config.max_length, self.config.caption_channels)

    def image_shape(self, height=None, width=None, vae=None, bae=None) -> tuple:
        c = self.config
        return (height or c.img_size, width or c.img_width or c.img_size,
                c.vae_embed_dim if self.decoder == "pixels" else 3)

    def generate_images(self, labels=None, num_images=None, generator=None, progress=False, vae=None, bae=None,
                        prompts=None, texts=None, text_encoder=None, height=None, width=None, **settings):
        """engine.generate for text-to-image: one image per prompt (or encoder output)."""
        if labels is not None:
            raise SamplingError("this is a text-to-image model: pass prompts=[...], not labels")
        if bae is not None:
            raise SamplingError("bae= is for models whose tokens a binary autoencoder decodes; this model "
                                "decodes with vae=")
        settings = self.resolve_settings(**settings)
        texts, bsz = self.texts_for(prompts, texts, text_encoder, num_images)
        tokens = self.sample_tokens(bsz, texts=texts, height=height, width=width, progress=progress,
                                    generator=generator, **settings)
        return self.decode(tokens, vae)

    def texts_for(self, prompts=None, texts=None, text_encoder=None, num_images=None):
        """(text-encoder outputs or None, batch size) of a text-to-image call."""
        return texts_for(self, prompts, texts, text_encoder, num_images)

    def condition_of(self, label=None, texts=None) -> Condition:
        if texts is not None:
            texts = texts.reshape(1, *texts.shape[-2:])
        return Condition.text(texts, 1, self.config.max_length, self.config.caption_channels, self.device)


def texts_for(model, prompts, texts, text_encoder, num_images):
    """(text-encoder outputs or None, batch size) of a text-to-image call."""
    c = model.config
    num_images = check_num_images(num_images)
    if texts is not None:
        if prompts is not None:
            raise SamplingError("pass prompts or texts, not both")
        if not isinstance(texts, torch.Tensor) or texts.ndim != 3:
            raise SamplingError(f"texts must be a tensor [B, {c.max_length}, {c.caption_channels}] of "
                                "text-encoder outputs; encode prompts with engine.load_text_encoder(DIR), "
                                "or pass prompts=[...]")
        if num_images is not None and num_images != len(texts):
            raise SamplingError(f"num_images={num_images} but {len(texts)} texts")
        return texts, len(texts)
    if prompts is None:
        if num_images is None:
            raise SamplingError("pass prompts=[...] (or num_images for unconditional samples)")
        return None, num_images
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts \
            or not all(isinstance(p, str) for p in prompts):
        raise SamplingError(f"prompts must be a non-empty list of strings, got {prompts!r:.100}")
    if num_images is not None and num_images != len(prompts):
        raise SamplingError(f"num_images={num_images} but {len(prompts)} prompts")
    encoder = text_encoder if text_encoder is not None else getattr(model, "text_encoder", None)
    if encoder is None:
        raise SamplingError("prompts need a text encoder: pass text_encoder=engine.load_text_encoder(DIR, "
                            "max_length=model.config.max_length), or set model.text_encoder")
    length, channels = getattr(encoder, "max_length", None), getattr(encoder, "channels", None)
    if length != c.max_length or channels != c.caption_channels:
        raise SamplingError(f"the text encoder gives [*, {length}, {channels}] but the model reads "
                            f"[*, {c.max_length}, {c.caption_channels}] (max_length, caption_channels); "
                            "load the encoder with max_length=model.config.max_length (and the T5 the "
                            "model was trained with)")
    return encoder(list(prompts)).to(model.device), len(prompts)


def _family() -> Family:
    from ..models.fluid import Fluid

    family = Family(name=FAMILY_NAME, config_cls=FluidConfig, presets=PRESETS, module_cls=Fluid,
                    model_cls=FluidModel, marker_keys=("text_emb.text_proj.linear_1.weight", "fake_latent"),
                    infer_sizes=infer_sizes,
                    head_fields=("encoder_num_heads", "decoder_num_heads", "cross_num_heads"),
                    ignored_args=TRAINING_ONLY,
                    default_ema=False,   # LightGen's sampling scripts read checkpoint['model']
                    recognises=is_fluid, patch=patch_published)
    return family.with_drop_in(from_published)


def patch_published(published, engine_model) -> None:
    """FLUID.sample_tokens with LightGen's signature defaults (height = width = 512)."""
    sample = engine_model.sample_tokens

    def sample_tokens(bsz, num_iter=64, cfg=1.0, cfg_schedule="linear", texts=None, temperature=1.0,
                      height=512, width=512, progress=False, generator=None):
        return sample(bsz, num_iter=num_iter, cfg=cfg, cfg_schedule=cfg_schedule, texts=texts,
                      temperature=temperature, height=height, width=width, progress=progress,
                      generator=generator)
    published.sample_tokens = sample_tokens


FAMILY = _family()
