"""MAR (class-conditional, random-order masked AR over continuous tokens): the published
`models/mar.py` `MAR`. Its modules live in engine/models/mar.py, its configuration in
engine/core/config.py."""
from __future__ import annotations

import re

import torch

from ..ops.diffusion import NUM_TRAIN_TIMESTEPS, space_timesteps
from ..core.conditioning import Condition
from ..core.errors import ConfigError
from ..model import Model
from ..core.plan import MAX_BATCH, check_count
from .record import Family

FAMILY_NAME = "mar"
# fast= modes (engine.core.fast): DiSA anneals the diffusion head's steps, LazyMAR caches features.
FAST_MODES = ("disa", "lazy")


def shape_of(state: dict, key: str):
    t = state.get(key)
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def depth_of(state: dict, prefix: str) -> int:
    """Number of blocks `prefix.{i}.` in a state dict (0 when none)."""
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def infer_sizes(state: dict) -> dict:
    """Configuration fields that the tensor shapes determine (head counts are not among them)."""
    out = {}
    shape = lambda key: shape_of(state, key)  # noqa: E731
    if shape("class_emb.weight"):
        out["class_num"], out["encoder_embed_dim"] = shape("class_emb.weight")
    if shape("mask_token"):
        out["decoder_embed_dim"] = shape("mask_token")[-1]
    if shape("encoder_pos_embed_learned") and shape("diffusion_pos_embed_learned"):
        out["buffer_size"] = shape("encoder_pos_embed_learned")[1] - shape("diffusion_pos_embed_learned")[1]
    out["encoder_depth"] = depth_of(state, "encoder_blocks")
    out["decoder_depth"] = depth_of(state, "decoder_blocks")
    out["diffloss_d"] = depth_of(state, "diffloss.net.res_blocks")
    out.update(head_and_mlp_sizes(state, out.get("encoder_embed_dim")))
    return out


def head_and_mlp_sizes(state: dict, encoder_width: int | None) -> dict:
    """The diffusion head's width and the blocks' MLP ratio, shared by the MAR-style families."""
    out = {}
    if shape_of(state, "diffloss.net.input_proj.weight"):
        out["diffloss_w"] = shape_of(state, "diffloss.net.input_proj.weight")[0]
    fc1 = shape_of(state, "encoder_blocks.0.mlp.fc1.weight")
    if fc1 and encoder_width:
        out["mlp_ratio"] = fc1[0] / encoder_width
    return out


class MARModel(Model):
    """Class-conditional MAR. `sample_tokens` has the published signature and results."""

    family = FAMILY_NAME
    fast_modes = FAST_MODES

    def sample_tokens(self, bsz: int, num_iter: int = 64, cfg=1.0, cfg_schedule="linear",
                      labels=None, temperature=1.0, progress: bool = False, generator=None, fast="exact"):
        """Sample `[bsz, vae_embed_dim, h, w]` tokens (unpatchified latents, or pixels in [-1, 1]
        for pixel-token models).

        Without `generator` it draws from numpy's and torch's global RNGs in the published order,
        so after `torch.manual_seed(s); np.random.seed(s)` it returns the published tokens. With a
        `torch.Generator`, that generator alone drives orders and noise (no global state read);
        with a list of one per image, image i depends on generator i alone. `cfg`,
        `cfg_schedule` and `temperature` may also be given per image. Steps of the published
        schedule that would predict no token (num_iter > seq_len) are skipped. `fast`: "exact"
        (the published tokens), "disa", "lazy", "disa+lazy" or a dict (docs/fast.md)."""
        bsz = check_count("bsz", bsz, MAX_BATCH)
        fast = self.check_fast(fast)
        condition = Condition.labels(labels, bsz, self.config.class_num, self.device)
        return self.sample(bsz, condition, self.mar.grid(), num_iter=num_iter, cfg=cfg,
                           cfg_schedule=cfg_schedule, temperature=temperature, progress=progress,
                           generator=generator, fast=fast)


# Drop-in use with an instance of the published MAR (and LightGen's FLUID, which shares it) ------
def _respacing_of(published) -> str:
    """The respacing string that reproduces the published model's kept timesteps."""
    diffusion = getattr(getattr(published, "diffloss", None), "gen_diffusion", None)
    kept = sorted(getattr(diffusion, "use_timesteps", None) or getattr(diffusion, "timestep_map", []) or [])
    if not kept:
        raise ConfigError("cannot read the sampling respacing (diffloss.gen_diffusion); "
                          "pass num_sampling_steps=...")
    for spec in (str(len(kept)), f"ddim{len(kept)}"):
        try:
            if space_timesteps(NUM_TRAIN_TIMESTEPS, spec) == kept:
                return spec
        except ConfigError:
            pass
    raise ConfigError("the published model uses a sectioned respacing; pass num_sampling_steps="
                      "the string it was built with (e.g. '10,5')")


def is_fluid(published) -> bool:
    return hasattr(published, "cross_attn_blocks") and hasattr(published, "text_emb")


def config_of(published) -> dict:
    """Configuration values read from a published model's attributes and modules."""
    try:
        enc, dec = published.encoder_blocks, published.decoder_blocks
        net = published.diffloss.net
        values = dict(
            img_size=published.img_size, vae_stride=published.vae_stride,
            patch_size=published.patch_size, vae_embed_dim=published.vae_embed_dim,
            encoder_embed_dim=published.z_proj.weight.shape[0], encoder_depth=len(enc),
            decoder_embed_dim=published.mask_token.shape[-1], decoder_depth=len(dec),
            diffloss_d=len(net.res_blocks), diffloss_w=net.input_proj.weight.shape[0])
        if is_fluid(published):
            cross, aligner = published.cross_attn_blocks, published.text_emb
            values.update(cross_embed_dim=published.fake_latent.shape[-1], cross_depth=len(cross),
                          text_depth=len(aligner.text_aligner),
                          caption_channels=aligner.text_proj.linear_1.weight.shape[1],
                          max_length=published.max_length,
                          interpolate_offset=published.interpolate_offset,
                          norm_eps=published.encoder_norm.eps)
            if len(cross):
                values["cross_num_heads"] = cross[0].attn.num_heads
        else:
            values.update(class_num=published.class_emb.weight.shape[0], buffer_size=published.buffer_size)
        if len(enc):
            values["encoder_num_heads"] = enc[0].attn.num_heads
            values["mlp_ratio"] = enc[0].mlp.fc1.weight.shape[0] / values["encoder_embed_dim"]
        if len(dec):
            values["decoder_num_heads"] = dec[0].attn.num_heads
    except AttributeError as err:
        raise ConfigError(f"not a published MAR or FLUID model: {err}") from None
    return values


def is_mar(published) -> bool:
    return hasattr(published, "class_emb") and hasattr(published, "diffloss") and not is_fluid(published)


def from_published(family: Family, published, backend="auto", num_sampling_steps=None, **config):
    """An engine model of `family` with the published MAR / FLUID's weights (and device)."""
    from .checkpoints import build_module

    values = config_of(published)
    values["num_sampling_steps"] = num_sampling_steps or _respacing_of(published)
    values.update(config)
    cfg = family.config_cls.from_dict(values)
    state = {k: v.detach() for k, v in published.state_dict().items()}
    device = next(iter(state.values())).device
    module = build_module(state, cfg, f"{type(published).__name__} instance", family).to(device)
    return family.model_cls(module, backend=backend)


def patch_sample_tokens(published, engine_model) -> None:
    published.sample_tokens = engine_model.sample_tokens


def _family() -> Family:
    from ..core.config import PRESETS, MARConfig
    from ..models.mar import MAR

    family = Family(name=FAMILY_NAME, config_cls=MARConfig, presets=PRESETS, module_cls=MAR,
                    model_cls=MARModel, marker_keys=("class_emb.weight", "diffusion_pos_embed_learned"),
                    infer_sizes=infer_sizes, head_fields=("encoder_num_heads", "decoder_num_heads"),
                    formats=("engine-mar",), recognises=is_mar, patch=patch_sample_tokens)
    return family.with_drop_in(from_published)


FAMILY = _family()
