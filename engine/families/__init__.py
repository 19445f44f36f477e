"""Model families: what `engine.load` recognises and builds. A family adds its configuration,
its modules (state-dict compatible with the published code) and its step; the plan, the loop,
the runners, the head backends and the CLI are shared (engine/sampler.py, engine/model.py).

A family is described by a `Family` record:
  config_cls     dataclass of its configuration (typed fields, `validate()`, derived sizes)
  presets        published preset name -> sizes (`args.model` of a checkpoint names one)
  module_cls     the transformer + head `nn.Module`, built from a config on the meta device;
                 it implements grid(), step_context(condition, bsz, use_cfg, grid),
                 forward_step(tokens, known, predict, context), unpatchify(tokens, grid),
                 pack_linears(dtype) and has `diffloss.net` (the diffusion head)
  model_cls      the engine Model subclass whose `sample_tokens` has the published signature
  marker_keys    state-dict keys only this family's checkpoints have
  infer_sizes    state dict -> the configuration fields its shapes determine
  head_fields    configuration fields that the weights cannot tell (head counts)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..core.errors import CheckpointError, ConfigError


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

    def owns_preset(self, preset) -> bool:
        return isinstance(preset, str) and preset in self.presets


def families() -> dict[str, Family]:
    from . import causal, ctf, elm, elm_mlm, fluid, mar   # imported on first use: keeps `import engine` light

    # elm-mlm before elm-ar: its checkpoints also have elm-ar's marker keys.
    return {f.name: f for f in (mar.FAMILY, fluid.FAMILY, elm_mlm.FAMILY, elm.FAMILY, causal.FAMILY, ctf.FAMILY)}


def get_family(name: str) -> Family:
    known = families()
    if name not in known:
        raise ConfigError(f"unknown model family {name!r}; known: {sorted(known)}")
    return known[name]


def family_of_config(config) -> Family:
    for family in families().values():
        if isinstance(config, family.config_cls):
            return family
    raise ConfigError(f"{type(config).__name__} is not the configuration of a known family")


def detect_family(state: dict, args: dict, source: str, requested: str | None = None) -> Family:
    """The family of a checkpoint: the caller's `family=`, else the keys its weights have, else
    the preset its args name."""
    if requested is not None:
        return get_family(requested)
    known = families().values()
    for family in known:
        if all(key in state for key in family.marker_keys):
            return family
    preset = args.get("model") if isinstance(args, dict) else None
    for family in known:
        if family.owns_preset(preset):
            return family
    markers = {f.name: list(f.marker_keys) for f in known}
    raise CheckpointError(f"{source}: the weights are not of a known family (expected the keys "
                          f"{markers}); pass family=NAME if they are")
