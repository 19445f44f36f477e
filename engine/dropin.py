"""Drop-in use with a model object of the published MAR code (duck-typed; its code is not imported)."""
from __future__ import annotations

import torch

from .config import MARConfig
from .diffusion import space_timesteps, NUM_TRAIN_TIMESTEPS
from .errors import ConfigError
from .loading import build_mar
from .model import MARModel


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


def config_of(published) -> MARConfig:
    try:
        enc, dec = published.encoder_blocks, published.decoder_blocks
        net = published.diffloss.net
        values = dict(
            img_size=published.img_size, vae_stride=published.vae_stride,
            patch_size=published.patch_size, vae_embed_dim=published.vae_embed_dim,
            encoder_embed_dim=published.class_emb.weight.shape[1], encoder_depth=len(enc),
            decoder_embed_dim=published.mask_token.shape[-1], decoder_depth=len(dec),
            class_num=published.class_emb.weight.shape[0], buffer_size=published.buffer_size,
            diffloss_d=len(net.res_blocks), diffloss_w=net.input_proj.weight.shape[0])
        if len(enc):
            values["encoder_num_heads"] = enc[0].attn.num_heads
            values["mlp_ratio"] = enc[0].mlp.fc1.weight.shape[0] / values["encoder_embed_dim"]
        if len(dec):
            values["decoder_num_heads"] = dec[0].attn.num_heads
    except AttributeError as err:
        raise ConfigError(f"not a published MAR model: {err}") from None
    return values


def accelerate(published, backend="auto", num_sampling_steps: str | None = None, **config) -> MARModel:
    """An engine model with the published model's weights (and device); `sample_tokens` gives
    the same results as the published one for the same seeds."""
    values = config_of(published)
    values["num_sampling_steps"] = num_sampling_steps or _respacing_of(published)
    values.update(config)
    cfg = MARConfig.from_dict(values)
    state = {k: v.detach() for k, v in published.state_dict().items()}
    device = next(iter(state.values())).device
    mar = build_mar(state, cfg, f"{type(published).__name__} instance").to(device)
    return MARModel(mar, backend=backend)


def patch(published, backend="auto", num_sampling_steps: str | None = None, **config):
    """Replace `published.sample_tokens` in place with the engine's (weights read now: patch again
    after changing them). Returns the same object."""
    engine_model = accelerate(published, backend=backend, num_sampling_steps=num_sampling_steps, **config)
    published.sample_tokens = engine_model.sample_tokens
    published.engine_model = engine_model
    return published
