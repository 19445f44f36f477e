"""A family's checkpoint checks and engine directories: keys and shapes against the module the
configuration builds, values its own check vouches for, and the directory format
(config.json + model.safetensors) written for any family."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..core.errors import CheckpointError, OutputError
from ..core.io import CONFIG_FILE, WEIGHTS_FILE, check_dtypes, check_finite

ENGINE_FORMAT = "engine-mar"      # the format a directory of the masked families is written in
ENGINE_FORMAT_VERSION = 1
# What an engine model directory holds (weights, config, companions, the built-in models' reports).
MODEL_DIR_ENTRIES = frozenset({CONFIG_FILE, WEIGHTS_FILE, "bae", "text_encoder", "evaluation.json",
                               "history.json"})


def check_state_dict(state: dict, config, source: str, family) -> None:
    """Keys and shapes must be exactly those of `family`'s module built from `config` (whose
    sizes the config has checked against its limits), and every value finite."""
    bad_types = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad_types:
        raise CheckpointError(f"{source}: entries that are not tensors: {bad_types[:5]}")
    with torch.device("meta"):
        module = family.module_cls(config)
    module_state = module.state_dict()
    expected = {k: tuple(v.shape) for k, v in module_state.items()}
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
    check_dtypes(state, source, {k: v.dtype for k, v in module_state.items()})
    check = family.check_state
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


def build_module(state: dict, config, source: str, family, dtype=torch.float32):
    """`family`'s module for `config` with the weights of `state` (checked first)."""
    check_state_dict(state, config, source, family)
    with torch.device("meta"):
        module = family.module_cls(config)
    module.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, assign=True)
    return module


def save_engine_dir(state: dict, config, out_dir, family, extra: dict | None = None) -> Path:
    """`state` and `config` of `family` as an engine directory (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / WEIGHTS_FILE))
    meta = {"format": ENGINE_FORMAT, "version": ENGINE_FORMAT_VERSION,
            "family": family.name, "config": config.to_dict()}
    meta.update(extra or {})
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out




def check_engine_dir_output(out_dir, force: bool = False) -> Path:
    """`out_dir` as a new engine directory's path: its parent exists (never created), and it is
    absent, empty, or (with `force`) a directory to replace."""
    out = Path(out_dir)
    parent = out.absolute().parent
    if not parent.is_dir():
        raise OutputError(f"{out}: the parent directory {parent} does not exist (create it first)")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise OutputError(f"{out} is not empty; pass --force (force=True) to replace it")
        # --force replaces a model directory, never a folder of other files (a typo'd `.`, a
        # home directory, the folder holding the source): those are for the user to remove.
        others = sorted(p.name for p in out.iterdir() if p.name not in MODEL_DIR_ENTRIES)
        if others:
            raise OutputError(f"{out} holds files that are not an engine model directory's "
                              f"({', '.join(map(repr, others[:3]))}{', ...' if len(others) > 3 else ''}); "
                              "--force only replaces a model directory: remove them yourself")
    return out


def write_engine_dir(state: dict, config, out_dir, family, extra: dict | None = None,
                     force: bool = False, companions: dict | None = None) -> Path:
    """save_engine_dir, all or nothing: written into a temporary directory beside `out_dir`, then
    renamed into place, so a run killed at any moment leaves no directory or a complete one (never
    new weights beside an old config). `force` replaces an existing non-empty directory;
    `companions` ({name: directory}) are copied in as OUT/name (a model's own BAE, text encoder)."""
    out = check_engine_dir_output(out_dir, force)
    parent = out.absolute().parent
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.partial-"))
    old = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)   # mkdtemp's 0700 would otherwise become the directory's mode
        save_engine_dir(state, config, tmp, family, extra)
        for name, source in (companions or {}).items():
            shutil.copytree(source, tmp / name)
        if out.is_dir():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.replaced-"))
            os.rename(out, old / "dir")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "dir").exists() and not out.exists():
            os.rename(old / "dir", out)   # put back what --force was replacing
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out
