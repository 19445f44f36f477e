"""Drop-in use with a model object of the published code (MAR's `MAR`, LightGen's `FLUID`, ELM's
AR `Transformer`), duck-typed: their code is never imported."""
from __future__ import annotations

import functools

from .ops.diffusion import space_timesteps, NUM_TRAIN_TIMESTEPS
from .core.errors import ConfigError
from .loading import build_module


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


def accelerate(published, backend="auto", num_sampling_steps: str | None = None, **config):
    """An engine model with the published model's weights (and device); `sample_tokens` gives
    the same results as the published one for the same seeds."""
    from .families import elm, elm_mlm, get_family

    if elm_mlm.is_elm_mlm(published):   # ELM's masked Transformer (checked first: it looks like the AR one)
        return elm_mlm.accelerate(published, backend=backend, **config)
    if elm.is_elm(published):   # ELM's AR Transformer: no diffusion head, no respacing
        return elm.accelerate(published, backend=backend, **config)
    family = get_family("fluid" if is_fluid(published) else "mar")
    values = config_of(published)
    values["num_sampling_steps"] = num_sampling_steps or _respacing_of(published)
    values.update(config)
    cfg = family.config_cls.from_dict(values)
    state = {k: v.detach() for k, v in published.state_dict().items()}
    device = next(iter(state.values())).device
    module = build_module(state, cfg, f"{type(published).__name__} instance").to(device)
    return family.model_cls(module, backend=backend)


def patch(published, backend="auto", num_sampling_steps: str | None = None, **config):
    """Replace `published.sample_tokens` in place with the engine's (weights read now: patch again
    after changing them). Returns the same object. A FLUID keeps LightGen's signature defaults
    (height = width = 512)."""
    engine_model = accelerate(published, backend=backend, num_sampling_steps=num_sampling_steps, **config)
    if engine_model.family in ("elm-ar", "elm-mlm"):   # ELM samples with generate_cfg
        published.generate_cfg = engine_model.generate_cfg
        published.engine_model = engine_model
        return published
    sample = engine_model.sample_tokens
    if engine_model.family == "fluid":
        sample = functools.partial(_fluid_published_defaults, sample)
    published.sample_tokens = sample
    published.engine_model = engine_model
    return published


def _fluid_published_defaults(sample, bsz, num_iter=64, cfg=1.0, cfg_schedule="linear", texts=None,
                              temperature=1.0, height=512, width=512, progress=False, generator=None):
    return sample(bsz, num_iter=num_iter, cfg=cfg, cfg_schedule=cfg_schedule, texts=texts,
                  temperature=temperature, height=height, width=width, progress=progress,
                  generator=generator)
