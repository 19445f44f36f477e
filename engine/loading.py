"""Reading published checkpoints of every family (MAR's `checkpoint-last.pth`, LightGen's Fluid
checkpoints) and the engine's own format (a directory with `config.json` + `model.safetensors`),
with errors that name the problem. Which family a checkpoint holds: engine/families.

Nothing here unpickles arbitrary objects: `.pth` files are read with `weights_only=True`, and the
only class allowed besides tensors and containers is `argparse.Namespace` (the run's `args`)."""
from __future__ import annotations

import argparse
import json
import os
import re
import threading
from pathlib import Path

import torch

from .core.config import config_from_args
from .core.errors import CheckpointError, ConfigError
from .families import detect_family, family_of_config, get_family
from .families.mar import infer_sizes  # noqa: F401  (MAR's, re-exported for callers)

ENGINE_FORMAT = "engine-mar"
ENGINE_FORMAT_VERSION = 1
ENGINE_FORMATS = {ENGINE_FORMAT: "mar", "engine-ctf": "ctf"}   # config.json "format" -> its default family
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
BUILTIN_DIR = Path(__file__).parent / "builtin" / "assets"
BUILTIN_MODELS = {"digits": BUILTIN_DIR / "digits", "digits-text": BUILTIN_DIR / "digits-text",
                  "digits-elm-ar": BUILTIN_DIR / "digits-elm-ar", "digits-causal": BUILTIN_DIR / "digits-causal",
                  "digits-elm-mlm": BUILTIN_DIR / "digits-elm-mlm", "digits-ctf": BUILTIN_DIR / "digits-ctf"}
TEXT_ENCODER_DIR = "text_encoder"   # an engine directory's own T5 (text-to-image models)
BAE_DIR = "bae"                     # an engine directory's own binary autoencoder (BAE-token models)


_SAFE_GLOBALS_LOCK = threading.Lock()


def _allow_namespace() -> None:
    """Allow `argparse.Namespace` in every weights-only load of this process. Registered, never
    withdrawn: torch's `safe_globals` context manager is process-global, so one thread leaving it
    would withdraw the allowance from another thread's load in progress. Re-added (cheaply) on
    every load in case other code's `safe_globals([argparse.Namespace])` block removed it."""
    if argparse.Namespace not in torch.serialization.get_safe_globals():
        with _SAFE_GLOBALS_LOCK:
            if argparse.Namespace not in torch.serialization.get_safe_globals():
                torch.serialization.add_safe_globals([argparse.Namespace])


def torch_load_weights(path) -> object:
    """`torch.load(path, weights_only=True)` onto the CPU with `argparse.Namespace` allowed;
    thread-safe. Errors are torch's own (callers word them)."""
    for attempt in range(3):
        _allow_namespace()
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            # Only if someone withdrew the allowance between our registration and the load.
            if attempt == 2 or "argparse.Namespace" not in str(err):
                raise


def read_torch_file(path: Path) -> object:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory without {CONFIG_FILE}; expected a .pth file "
                              "or an engine model directory")
    try:
        return torch_load_weights(path)
    except Exception as err:  # torch raises many types here (zip, pickle, EOF, runtime)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(f"{path} holds Python objects other than tensors and the run's "
                                  f"args; refusing to unpickle them ({first})") from None
        raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated or "
                              f"corrupt?): {first}") from None


def _count_nonfinite(t: torch.Tensor) -> int:
    """0 when every value of the floating tensor `t` is finite, else how many are not
    (one fused min/max pass in the common, all-finite case)."""
    if t.numel() == 0 or t.is_meta:
        return 0
    try:
        low, high = torch.aminmax(t.detach())
        if bool(torch.isfinite(low) & torch.isfinite(high)):
            return 0
    except (RuntimeError, NotImplementedError):  # dtypes without aminmax (float8...)
        pass
    return int((~torch.isfinite(t.detach())).sum())


def check_finite(state: dict, source: str) -> None:
    """CheckpointError naming the first floating tensor of `state` holding NaN or Inf."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
            bad = _count_nonfinite(value)
            if bad:
                others = [k for k, v in state.items() if k != key and isinstance(v, torch.Tensor)
                          and (v.is_floating_point() or v.is_complex()) and _count_nonfinite(v)]
                more = f"; {len(others)} other tensors too, e.g. {others[:3]}" if others else ""
                raise CheckpointError(
                    f"{source}: tensor {key!r} holds {bad} non-finite values (NaN or Inf) of "
                    f"{value.numel()}{more}; refusing weights that cannot sample")


def check_state_dict(state: dict, config, source: str) -> None:
    """Keys and shapes must be exactly those of the family's module built from `config` (whose
    sizes the config has checked against its limits), and every value finite."""
    bad_types = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad_types:
        raise CheckpointError(f"{source}: entries that are not tensors: {bad_types[:5]}")
    with torch.device("meta"):
        module = family_of_config(config).module_cls(config)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} missing keys, e.g. {missing[:5]}")
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected keys, e.g. {unexpected[:5]}")
    for key, want in expected.items():
        got = tuple(state[key].shape)
        if got != want:
            raise CheckpointError(f"{source}: {key} has shape {list(got)} but the configuration "
                                  f"({describe(config)}) needs {list(want)}")
    check = family_of_config(config).check_state
    if check is not None:   # values the shapes cannot vouch for (CTF's cluster map)
        check(state, config, source)
    check_finite(state, source)


def describe(config) -> str:
    c = config
    if hasattr(c, "describe"):   # families whose sizes are not MAR's (ELM)
        return c.describe()
    text = (f"img_size={c.img_size}, vae_stride={c.vae_stride}, patch_size={c.patch_size}, "
            f"vae_embed_dim={c.vae_embed_dim}, encoder={c.encoder_depth}x{c.encoder_embed_dim}, "
            f"decoder={c.decoder_depth}x{c.decoder_embed_dim}, head={c.diffloss_d}x{c.diffloss_w}")
    for name in ("buffer_size", "class_num", "cross_depth", "caption_channels", "text_depth"):
        if hasattr(c, name):
            text += f", {name}={getattr(c, name)}"
    return text


def build_module(state: dict, config, source: str, dtype=torch.float32):
    """The family's module for `config` with the weights of `state` (checked first)."""
    check_state_dict(state, config, source)
    with torch.device("meta"):
        module = family_of_config(config).module_cls(config)
    module.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, assign=True)
    return module


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
    if not isinstance(meta, dict) or meta.get("format") not in ENGINE_FORMATS or "config" not in meta:
        raise CheckpointError(f"{cfg_file} is not an engine model config (format one of {sorted(ENGINE_FORMATS)})")
    if meta.get("version", 0) > ENGINE_FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file} has format version {meta['version']}; this engine reads "
                              f"up to {ENGINE_FORMAT_VERSION}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {err}") from None
    try:
        fam = get_family(meta.get("family", ENGINE_FORMATS[meta["format"]]))
        if family is not None and family != fam.name:
            raise ConfigError(f"the directory holds a {fam.name!r} model, not {family!r}")
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


def save_engine_dir(state: dict, config, out_dir, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / WEIGHTS_FILE))
    meta = {"format": ENGINE_FORMAT, "version": ENGINE_FORMAT_VERSION,
            "family": family_of_config(config).name, "config": config.to_dict()}
    meta.update(extra or {})
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def convert(src, out_dir, ema: bool | None = None, family: str | None = None, **overrides) -> Path:
    """Write a published checkpoint in the engine's format (validated first)."""
    state, config, _ = read_checkpoint(src, ema=ema, family=family, **overrides)
    check_state_dict(state, config, str(src))
    return save_engine_dir(state, config, out_dir, {"source": Path(src).name, "ema": ema})
