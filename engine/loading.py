"""Reading published checkpoints of every family (MAR's `checkpoint-last.pth`, LightGen's Fluid
checkpoints) and the engine's own format (a directory with `config.json` + `model.safetensors`),
with errors that name the problem. Which family a checkpoint holds: engine/families.

Nothing here unpickles arbitrary objects: `.pth` files are read with `weights_only=True`, and the
only class allowed besides tensors and containers is `argparse.Namespace` (the run's `args`)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from .core.config import config_from_args
from .core.errors import CheckpointError, ConfigError
from .core.io import CONFIG_FILE, WEIGHTS_FILE, check_finite, read_torch_file, torch_load_weights  # noqa: F401
from .families import checkpoints
from .families.checkpoints import ENGINE_FORMAT, ENGINE_FORMAT_VERSION, describe  # noqa: F401
from .families import detect_family, families, family_of_config, family_of_format, get_family
from .families.mar import infer_sizes  # noqa: F401  (MAR's, re-exported for callers)

BUILTIN_DIR = Path(__file__).parent / "builtin" / "assets"
BUILTIN_MODELS = {"digits": BUILTIN_DIR / "digits", "digits-text": BUILTIN_DIR / "digits-text",
                  "digits-elm-ar": BUILTIN_DIR / "digits-elm-ar", "digits-causal": BUILTIN_DIR / "digits-causal",
                  "digits-elm-mlm": BUILTIN_DIR / "digits-elm-mlm", "digits-ctf": BUILTIN_DIR / "digits-ctf"}
TEXT_ENCODER_DIR = "text_encoder"   # an engine directory's own T5 (text-to-image models)
BAE_DIR = "bae"                     # an engine directory's own binary autoencoder (BAE-token models)


def check_state_dict(state: dict, config, source: str) -> None:
    """Keys, shapes and values of `state` against the module its family builds from `config`."""
    checkpoints.check_state_dict(state, config, source, family_of_config(config))


def build_module(state: dict, config, source: str, dtype=torch.float32):
    """The module of `config`'s family with the weights of `state` (checked first)."""
    return checkpoints.build_module(state, config, source, family_of_config(config), dtype)


def save_engine_dir(state: dict, config, out_dir, extra: dict | None = None):
    """An engine directory (config.json + model.safetensors) of `config`'s family."""
    return checkpoints.save_engine_dir(state, config, out_dir, family_of_config(config), extra)


def check_overrides(fam, overrides: dict) -> None:
    """The caller's config overrides (engine.load's keywords, `--config KEY=VALUE`, `--steps`) must
    be settings this family has: the error names the argument, not the checkpoint's config."""
    names = fam.config_cls.field_names()
    unknown = sorted(str(k) for k in overrides if k not in names and k not in fam.ignored_args)
    if not unknown:
        return
    if "num_sampling_steps" in unknown:
        raise ConfigError(f"num_sampling_steps (--steps) is a diffusion-head setting; the "
                          f"{fam.name} model draws its tokens without a diffusion head")
    raise ConfigError(f"the {fam.name} model has no setting {', '.join(map(repr, unknown))} "
                      f"(its settings: {', '.join(sorted(names))})")


def read_published(path: Path, ema: bool | None, overrides: dict, family: str | None = None):
    """ema: True -> 'model_ema', False -> 'model', None -> the family's default (MAR: the EMA
    weights its evaluation uses; Fluid: 'model', which LightGen's sampling scripts read)."""
    ckpt = read_torch_file(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    present = [k for k in ("model_ema", "model") if k in ckpt]
    if not present:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            state, args, key = ckpt, {}, "state dict"
        elif any(isinstance(v, torch.Tensor) for v in ckpt.values()):   # a state dict, damaged
            bad = sorted(str(k) for k, v in ckpt.items() if not isinstance(v, torch.Tensor))
            raise CheckpointError(f"{path}: a bare state dict with entries that are not tensors: "
                                  f"{bad[:8]}")
        else:
            raise CheckpointError(f"{path} is not a model checkpoint: expected 'model'/'model_ema' "
                                  f"entries or a bare state dict, found {sorted(map(str, ckpt))[:8]}")
    else:
        args = ckpt.get("args")
        if isinstance(args, argparse.Namespace):
            args = vars(args)
        elif args is None:
            args = {}
        elif not isinstance(args, dict):
            raise CheckpointError(f"{path}: 'args' is a {type(args).__name__}, expected the run's "
                                  "argparse.Namespace or a dict of its arguments")
        if ema is None:
            probe = ckpt[present[0]]
            probe = probe if isinstance(probe, dict) else {}
            ema = detect_family(probe, args, str(path), family).default_ema
        key = "model_ema" if ema else "model"
        if key not in ckpt:
            raise CheckpointError(f"{path} has no {key!r} weights (it has {present[0]!r}); "
                                  f"pass ema={not ema}")
        state = ckpt[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: {key!r} is a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    fam = detect_family(state, args, str(path), family)
    check_overrides(fam, overrides)
    try:
        config = config_from_args(args, fam.infer_sizes(state), overrides, fam.config_cls,
                                  fam.presets, fam.head_fields, fam.ignored_args)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return state, config, {}


def read_engine_dir(path: Path, overrides: dict, family: str | None = None):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.exists() or not weights.exists():
        raise CheckpointError(f"{path} is not an engine model directory: it needs {CONFIG_FILE} "
                              f"and {WEIGHTS_FILE}")
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {err}") from None
    except OSError as err:   # a directory, unreadable, ...
        raise CheckpointError(f"{cfg_file} cannot be read: {err.strerror or err}") from None

    formats = sorted(f for fam in families().values() for f in fam.formats)
    if not isinstance(meta, dict) or meta.get("format") not in formats:
        raise CheckpointError(f"{cfg_file} is not an engine model config (format one of {formats})")
    version = meta.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise CheckpointError(f"{cfg_file}: version must be a non-negative integer, got {version!r:.40}")
    if version > ENGINE_FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file} has format version {version}; this engine reads "
                              f"up to {ENGINE_FORMAT_VERSION}")
    for key, kind in (("config", dict), ("family", str), ("sampling", dict)):
        if (key in meta or key == "config") and not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{cfg_file}: {key!r} must be a JSON {'object' if kind is dict else 'string'}, "
                                  f"got {json.dumps(meta.get(key))[:60]}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {err}") from None
    try:
        fam = get_family(meta["family"]) if "family" in meta else family_of_format(meta["format"])
        if family is not None and family != fam.name:
            raise ConfigError(f"family={family!r} but the directory holds a {fam.name!r} model")
    except ConfigError as err:
        raise ConfigError(f"{cfg_file}: {err}") from None
    check_overrides(fam, overrides)
    try:
        values = {k: v for k, v in {**meta["config"], **overrides}.items() if k not in fam.ignored_args}
        config = fam.config_cls.from_dict(values)
    except (ConfigError, TypeError, AttributeError) as err:
        raise ConfigError(f"{cfg_file}: {err}") from None
    return state, config, meta.get("sampling", {})


def read_checkpoint(path, ema: bool | None = None, family: str | None = None, **overrides) -> tuple[dict, object, dict]:
    """(state dict, config, sampling defaults) from a published .pth, an engine directory, or a
    built-in name; `family` forces the family (else recognised, see engine.families). Sampling
    defaults (e.g. {"cfg": 2.0, "num_iter": 16}) come from an engine directory's config.json
    "sampling" entry; published checkpoints have none."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"expected a path or built-in name ({sorted(BUILTIN_MODELS)}), got "
                              f"{type(path).__name__} {path!r:.80}")
    if isinstance(path, str) and path in BUILTIN_MODELS:
        path = BUILTIN_MODELS[path]
        if not path.exists():
            raise CheckpointError(f"the built-in model files are missing from {path}; reinstall")
    path = Path(path)
    if path.is_dir() and (path / CONFIG_FILE).exists():
        return read_engine_dir(path, overrides, family)
    if path.suffix == ".safetensors" and (path.parent / CONFIG_FILE).exists():
        return read_engine_dir(path.parent, overrides, family)
    return read_published(path, ema, overrides, family)


def companion_text_encoder(path) -> Path | None:
    """The text-encoder directory shipped inside an engine model directory (or built-in model),
    if any: DIR/text_encoder, a Hugging Face T5 directory."""
    return companion_dir(path, TEXT_ENCODER_DIR)


def companion_dir(path, name: str) -> Path | None:
    """DIR/name when `path` is an engine model directory (or built-in model, or its weights
    file) that ships one: TEXT_ENCODER_DIR (a T5), BAE_DIR (a binary autoencoder)."""
    if isinstance(path, str) and path in BUILTIN_MODELS:
        path = BUILTIN_MODELS[path]
    if not isinstance(path, (str, os.PathLike)):
        return None
    path = Path(path)
    root = path.parent if path.suffix == ".safetensors" else path
    candidate = root / name
    return candidate if (root / CONFIG_FILE).exists() and candidate.is_dir() else None


def convert(src, out_dir, ema: bool | None = None, family: str | None = None, force: bool = False,
            **overrides) -> Path:
    """Write a published checkpoint in the engine's format (validated first), atomically: a new
    `out_dir` (its parent must exist; a non-empty one only with `force`), complete or absent. An
    engine directory's sampling defaults and companions (its BAE, its text encoder) come along, so
    the copy samples as the original does."""
    checkpoints.check_engine_dir_output(out_dir, force)   # before minutes of reading
    state, config, sampling = read_checkpoint(src, ema=ema, family=family, **overrides)
    check_state_dict(state, config, str(src))
    extra = {"source": Path(src).name, "ema": ema}
    if sampling:
        extra["sampling"] = sampling
    companions = {name: found for name in (BAE_DIR, TEXT_ENCODER_DIR)
                  if (found := companion_dir(src, name)) is not None}
    return checkpoints.write_engine_dir(state, config, out_dir, family_of_config(config), extra,
                                        force=force, companions=companions)
