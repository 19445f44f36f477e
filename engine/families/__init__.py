"""The registry of model families: what `engine.load` recognises and builds, one line each.

A family is one place here (its module, e.g. engine/families/elm.py, and its modules under
engine/models/) described by a `Family` record (engine/families/record.py: configuration class,
presets, module class, model class, checkpoint marker keys, drop-in hooks). The loaded model
implements the family protocol (engine/core/protocol.py) that every shared path calls; adding a
family: docs/contributing.md, "Adding a family"."""
from __future__ import annotations

from ..core.errors import CheckpointError, ConfigError
from .record import Family


def families() -> dict[str, Family]:
    from . import causal, ctf, elm, elm_mlm, fluid, mar   # imported on first use: keeps `import engine` light

    # elm-mlm before elm-ar: its checkpoints also have elm-ar's marker keys.
    return {f.name: f for f in (mar.FAMILY, fluid.FAMILY, elm_mlm.FAMILY, elm.FAMILY, causal.FAMILY, ctf.FAMILY)}


def get_family(name: str) -> Family:
    known = families()
    if name not in known:
        raise ConfigError(f"family {name!r} is not a model family; known: {sorted(known)}")
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


def family_of_format(fmt) -> Family | None:
    """The family an engine directory of format `fmt` holds when its config.json names none."""
    for family in families().values():
        if fmt in family.formats:
            return family
    return None
