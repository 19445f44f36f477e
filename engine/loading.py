"""Reading published MAR checkpoints (`checkpoint-last.pth`) and the engine's own format
(a directory with `config.json` + `model.safetensors`), with errors that name the problem.

Nothing here unpickles arbitrary objects: `.pth` files are read with `weights_only=True`, and the
only class allowed besides tensors and containers is `argparse.Namespace` (the run's `args`)."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from .config import MARConfig, config_from_args
from .errors import CheckpointError, ConfigError
from .models.mar import MAR

ENGINE_FORMAT = "engine-mar"
ENGINE_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
BUILTIN_DIR = Path(__file__).parent / "assets"
BUILTIN_MODELS = {"digits": BUILTIN_DIR / "digits"}


def read_torch_file(path: Path) -> object:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory without {CONFIG_FILE}; expected a .pth file "
                              "or an engine model directory")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types here (zip, pickle, EOF, runtime)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(f"{path} holds Python objects other than tensors and the run's "
                                  f"args; refusing to unpickle them ({first})") from None
        raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated or "
                              f"corrupt?): {first}") from None


def infer_sizes(state: dict) -> dict:
    """Configuration fields that the tensor shapes determine (head counts are not among them)."""
    out = {}

    def shape(key):
        t = state.get(key)
        return tuple(t.shape) if isinstance(t, torch.Tensor) else None

    def depth(prefix):
        found = {int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
        return max(found) + 1 if found else 0

    if shape("class_emb.weight"):
        out["class_num"], out["encoder_embed_dim"] = shape("class_emb.weight")
    if shape("mask_token"):
        out["decoder_embed_dim"] = shape("mask_token")[-1]
    if shape("encoder_pos_embed_learned") and shape("diffusion_pos_embed_learned"):
        out["buffer_size"] = shape("encoder_pos_embed_learned")[1] - shape("diffusion_pos_embed_learned")[1]
    out["encoder_depth"] = depth("encoder_blocks")
    out["decoder_depth"] = depth("decoder_blocks")
    out["diffloss_d"] = depth("diffloss.net.res_blocks")
    if shape("diffloss.net.input_proj.weight"):
        out["diffloss_w"] = shape("diffloss.net.input_proj.weight")[0]
    fc1, e = shape("encoder_blocks.0.mlp.fc1.weight"), out.get("encoder_embed_dim")
    if fc1 and e:
        out["mlp_ratio"] = fc1[0] / e
    return out


def check_state_dict(state: dict, config: MARConfig, source: str) -> None:
    """Keys and shapes must be exactly those of a MAR built from `config`."""
    bad_types = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad_types:
        raise CheckpointError(f"{source}: entries that are not tensors: {bad_types[:5]}")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MAR(config).state_dict().items()}
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


def describe(config: MARConfig) -> str:
    c = config
    return (f"img_size={c.img_size}, vae_stride={c.vae_stride}, patch_size={c.patch_size}, "
            f"vae_embed_dim={c.vae_embed_dim}, buffer_size={c.buffer_size}, "
            f"encoder={c.encoder_depth}x{c.encoder_embed_dim}, decoder={c.decoder_depth}x"
            f"{c.decoder_embed_dim}, head={c.diffloss_d}x{c.diffloss_w}, class_num={c.class_num}")


def build_mar(state: dict, config: MARConfig, source: str, dtype=torch.float32) -> MAR:
    check_state_dict(state, config, source)
    with torch.device("meta"):
        mar = MAR(config)
    mar.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return mar


def read_published(path: Path, ema: bool, overrides: dict) -> tuple[dict, MARConfig, dict]:
    ckpt = read_torch_file(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    key = "model_ema" if ema else "model"
    if key not in ckpt:
        if "model" in ckpt or "model_ema" in ckpt:
            other = "model" if ema else "model_ema"
            raise CheckpointError(f"{path} has no {key!r} weights (it has {other!r}); "
                                  f"pass ema={not ema}")
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            state, args = ckpt, {}
        else:
            raise CheckpointError(f"{path} is not a MAR checkpoint: expected 'model'/'model_ema' "
                                  f"entries, found {sorted(map(str, ckpt))[:8]}")
    else:
        state = ckpt[key]
        args = ckpt.get("args")
        args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: {key!r} is a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    inferred = infer_sizes(state)
    try:
        config = config_from_args(args, inferred, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return state, config, {}


def read_engine_dir(path: Path, overrides: dict) -> tuple[dict, MARConfig, dict]:
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
    if not isinstance(meta, dict) or meta.get("format") != ENGINE_FORMAT or "config" not in meta:
        raise CheckpointError(f"{cfg_file} is not an engine model config (format {ENGINE_FORMAT!r})")
    if meta.get("version", 0) > ENGINE_FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file} has format version {meta['version']}; this engine reads "
                              f"up to {ENGINE_FORMAT_VERSION}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {err}") from None
    try:
        config = MARConfig.from_dict({**meta["config"], **overrides})
    except (ConfigError, TypeError) as err:
        raise ConfigError(f"{cfg_file}: {err}") from None
    return state, config, meta.get("sampling", {})


def read_checkpoint(path, ema: bool = True, **overrides) -> tuple[dict, MARConfig, dict]:
    """(state dict, config, sampling defaults) from a published .pth, an engine directory, or a
    built-in name. Sampling defaults (e.g. {"cfg": 2.0, "num_iter": 16}) come from an engine
    directory's config.json "sampling" entry; published checkpoints have none."""
    if isinstance(path, str) and path in BUILTIN_MODELS:
        path = BUILTIN_MODELS[path]
        if not path.exists():
            raise CheckpointError(f"the built-in model files are missing from {path}; reinstall")
    path = Path(path)
    if path.is_dir() and (path / CONFIG_FILE).exists():
        return read_engine_dir(path, overrides)
    if path.suffix == ".safetensors" and (path.parent / CONFIG_FILE).exists():
        return read_engine_dir(path.parent, overrides)
    return read_published(path, ema, overrides)


def save_engine_dir(state: dict, config: MARConfig, out_dir, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / WEIGHTS_FILE))
    meta = {"format": ENGINE_FORMAT, "version": ENGINE_FORMAT_VERSION, "config": config.to_dict()}
    meta.update(extra or {})
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def convert(src, out_dir, ema: bool = True, **overrides) -> Path:
    """Write a published checkpoint in the engine's format (validated first)."""
    state, config, _ = read_checkpoint(src, ema=ema, **overrides)
    check_state_dict(state, config, str(src))
    return save_engine_dir(state, config, out_dir, {"source": Path(src).name, "ema": ema})
