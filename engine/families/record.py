"""The `Family` record: what the registry (engine/families/__init__.py) knows of a family."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    presets: dict
    module_cls: type
    model_cls: type
    marker_keys: tuple
    infer_sizes: object
    head_fields: tuple
    ignored_args: frozenset = field(default_factory=frozenset)   # training-only constructor args
    default_ema: bool = True   # which weights of a {'model', 'model_ema'} checkpoint load by default
    check_state: object = None   # (state, config, source) -> None: checks of values, not shapes (CTF's cluster map)
    formats: tuple = ()          # engine-directory formats whose config.json without "family" is this family
    # Drop-in use (engine.accelerate / patch) with an instance of the published class:
    recognises: object = None      # published object -> bool
    from_published: object = None  # (published, backend=, num_sampling_steps=, **config) -> engine model
    patch: object = None           # (published, engine_model) -> None: installs the engine's sampler on it

    def with_drop_in(self, build) -> "Family":
        """This record with `from_published` = build(family, published, ...)."""
        return dataclasses.replace(self, from_published=functools.partial(build, self))

    def owns_preset(self, preset) -> bool:
        return isinstance(preset, str) and preset in self.presets
