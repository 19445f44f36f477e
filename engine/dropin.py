"""Drop-in use with a model object of the published code (MAR's `MAR`, LightGen's `FLUID`, ELM's
`Transformer`s, ...), duck-typed: their code is never imported. Each family says whether it
recognises an object (`Family.recognises`), how to build an engine model from it
(`Family.from_published`) and what `patch` replaces on it (`Family.patch`)."""
from __future__ import annotations

from .core.errors import ConfigError


def family_of_published(published):
    from .families import families

    for family in families().values():
        if family.recognises is not None and family.recognises(published):
            return family
    raise ConfigError(f"{type(published).__name__} is not a published model the engine recognises "
                      f"(families with a drop-in: {[f.name for f in families().values() if f.recognises]})")


def accelerate(published, backend="auto", num_sampling_steps: str | None = None, **config):
    """An engine model with the published model's weights (and device); its sampler gives the
    same results as the published one for the same seeds."""
    family = family_of_published(published)
    return family.from_published(published, backend=backend, num_sampling_steps=num_sampling_steps, **config)


def patch(published, backend="auto", num_sampling_steps: str | None = None, **config):
    """Replace the published model's sampler (`sample_tokens`, ELM's `generate_cfg`) in place with
    the engine's (weights read now: patch again after changing them). Returns the same object."""
    family = family_of_published(published)
    engine_model = family.from_published(published, backend=backend, num_sampling_steps=num_sampling_steps, **config)
    family.patch(published, engine_model)
    published.engine_model = engine_model
    return published
